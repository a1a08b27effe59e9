"""Campaign effect: rates, lift and its interval checked by hand, the window's edges, returns, revenue and
redemption; a bad log named; the demo's planted coupon effect inside the interval."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from features.contract import C
from training.campaigns import CE, POOLED, CampaignLogError, campaign_effects, lift_interval

SENT = pd.Timestamp("2024-03-01 10:00", tz="UTC")


def _log(n_t: int, n_h: int, campaign: str = "CMP1", value: float | None = 5.0) -> pd.DataFrame:
    ids = [f"{campaign}-T{i}" for i in range(n_t)] + [f"{campaign}-H{i}" for i in range(n_h)]
    return pd.DataFrame({C.CAMPAIGN_ID: campaign, C.MEMBER_ID: ids, C.ARM: ["treatment"] * n_t + ["holdout"] * n_h,
                         C.SENT_AT: SENT, C.COUPON: "SAVE5", C.COUPON_VALUE: np.nan if value is None else value})


def _line(member: str, days: float, amount: float = 20.0, discount: float = 0.0, order: str | None = None,
          is_return: bool = False) -> dict:
    return {C.MEMBER_ID: member, C.ORDER_ID: order or f"O-{member}-{days}", C.TS: SENT + pd.Timedelta(days=days),
            C.AMOUNT: amount, C.DISCOUNT: discount, C.IS_RETURN: is_return}


def test_lift_and_interval_match_the_hand_computed_example() -> None:
    # 30 of 100 treated and 20 of 100 held out bought within 7 days:
    # lift 0.10, se = sqrt(.3 * .7 / 100 + .2 * .8 / 100) = sqrt(0.0037) = 0.0608276, x 1.959964 = 0.119220
    log = _log(100, 100)
    lines = [_line(f"CMP1-T{i}", 3) for i in range(30)] + [_line(f"CMP1-H{i}", 5) for i in range(20)]
    r = campaign_effects(log, pd.DataFrame(lines), windows=(7,)).iloc[0]
    assert (r[CE.N_TREATMENT], r[CE.N_HOLDOUT]) == (100, 100)
    assert r[CE.RATE_TREATMENT] == pytest.approx(0.30) and r[CE.RATE_HOLDOUT] == pytest.approx(0.20)
    assert r[CE.LIFT] == pytest.approx(0.10)
    assert r[CE.LIFT_LOW] == pytest.approx(0.10 - 0.119220, abs=1e-6)
    assert r[CE.LIFT_HIGH] == pytest.approx(0.10 + 0.119220, abs=1e-6)
    assert r[CE.LIFT_REL] == pytest.approx(0.5)
    # revenue: 30 x 20 over 100 treated = 6.00 a member, 20 x 20 / 100 = 4.00: (6 - 4) x 100 = 200;
    # variances 20^2 * .3 * .7 * 100/99 and 20^2 * .2 * .8 * 100/99 over 100 each
    se = math.sqrt((400 * 0.21 * 100 / 99) / 100 + (400 * 0.16 * 100 / 99) / 100)
    assert r[CE.INCREMENTAL] == pytest.approx(200.0)
    assert r[CE.INCREMENTAL_HIGH] - r[CE.INCREMENTAL] == pytest.approx(1.959964 * se * 100, rel=1e-5)
    assert lift_interval(30, 100, 20, 100)[0] == pytest.approx(0.10)
    assert all(math.isnan(v) for v in lift_interval(1, 10, 0, 0))


def test_windows_count_purchases_after_the_send_up_to_the_last_day_and_not_returns() -> None:
    log = _log(5, 1)
    lines = pd.DataFrame([
        _line("CMP1-T0", 0),  # at the send: not after it
        _line("CMP1-T1", 7),  # on the 7th day: inside 7
        _line("CMP1-T2", 7.01),  # just after: inside 14 only
        _line("CMP1-T3", 2, amount=-20.0, is_return=True),  # a return is no purchase (its money counts)
        _line("CMP1-T4", -1),  # before the send
        _line("CMP1-H0", 20),
    ])
    r = campaign_effects(log, lines, windows=(7, 14, 30)).set_index(CE.WINDOW)
    assert r.loc[7, CE.RATE_TREATMENT] == pytest.approx(1 / 5)
    assert r.loc[14, CE.RATE_TREATMENT] == pytest.approx(2 / 5)
    assert r.loc[14, CE.RATE_HOLDOUT] == 0.0 and r.loc[30, CE.RATE_HOLDOUT] == 1.0
    assert r.loc[14, CE.REVENUE_TREATMENT] == pytest.approx((20 + 20 - 20) / 5)


def test_redemption_is_an_order_discounted_by_the_coupon() -> None:
    log = pd.concat([_log(4, 1), _log(2, 1, campaign="CMP2", value=None)], ignore_index=True)
    lines = pd.DataFrame([
        _line("CMP1-T0", 2, amount=15.0, discount=3.0, order="A"), _line("CMP1-T0", 2, amount=5, discount=2.0,
                                                                         order="A"),  # 5.00 over two lines
        _line("CMP1-T1", 2, amount=18.0, discount=2.0),  # a 10% discount, not the coupon
        _line("CMP1-T2", 2, amount=0.0, discount=4.0),  # a 4.00 order paid by the coupon in full
        _line("CMP2-T0", 2, amount=15.0, discount=5.0),  # campaign without a coupon value
    ])
    r = campaign_effects(log, lines, windows=(7,)).set_index(CE.CAMPAIGN_ID)
    assert r.loc["CMP1", CE.REDEMPTION] == pytest.approx(2 / 4)
    assert np.isnan(r.loc["CMP2", CE.REDEMPTION])
    assert list(r.index) == ["CMP1", "CMP2", POOLED]
    assert r.loc[POOLED, CE.N_TREATMENT] == 6 and r.loc[POOLED, CE.REDEMPTION] == pytest.approx(2 / 4)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.drop(columns=[C.SENT_AT]), "lacks column"),
    (lambda d: d.assign(**{C.ARM: ["treatment", "control", "holdout"]}), "arm must be 'treatment' or 'holdout'"),
    (lambda d: d.assign(**{C.MEMBER_ID: ["M1", "M1", "M2"]}), "member 'M1' more than once in campaign 'CMP1'"),
    (lambda d: d.assign(**{C.SENT_AT: ["2024-03-01", "soon", None]}), r"rows \[1, 2\]: sent_at"),
])
def test_a_bad_log_is_refused_naming_what_is_wrong(change, message) -> None:
    log = change(pd.DataFrame({C.CAMPAIGN_ID: "CMP1", C.MEMBER_ID: ["M1", "M2", "M3"],
                               C.ARM: ["treatment", "treatment", "holdout"], C.SENT_AT: SENT}))
    with pytest.raises(CampaignLogError, match=message):
        campaign_effects(log, pd.DataFrame([_line("M1", 1)]))


def test_the_demo_campaigns_recover_the_planted_effect(demo_workspace) -> None:
    from training.dataset import read_lake_table

    settings, _ = demo_workspace
    truth = pd.read_parquet(settings.dirs.raw / "demo" / "truth" / "campaign_effects.parquet")
    truth = truth.set_index(C.CAMPAIGN_ID)
    log = read_lake_table(settings, "campaigns")
    lines = read_lake_table(settings, "transactions", columns=[C.MEMBER_ID, C.ORDER_ID, C.TS, C.AMOUNT,
                                                               C.DISCOUNT, C.IS_RETURN])
    r = campaign_effects(log, lines).set_index([CE.CAMPAIGN_ID, CE.WINDOW])
    for w in (7, 14, 30):
        pooled = r.loc[(POOLED, w)]
        # the same arms' rates as the generator's truth, and its realised uplift inside our interval
        assert pooled[CE.RATE_TREATMENT] == pytest.approx(truth.loc[POOLED, f"rate_treatment_{w}d"])
        assert pooled[CE.RATE_HOLDOUT] == pytest.approx(truth.loc[POOLED, f"rate_holdout_{w}d"])
        assert pooled[CE.LIFT_LOW] <= truth.loc[POOLED, f"uplift_abs_{w}d"] <= pooled[CE.LIFT_HIGH]
    assert r.loc[(POOLED, 7), CE.LIFT_LOW] > 0  # the coupons work: the interval excludes no effect
    assert 0 < r.loc[(POOLED, 30), CE.REDEMPTION] < 1
