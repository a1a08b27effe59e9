"""Labels on a crafted three-member table with exact expected values, censoring and the midnight rule."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from features.contract import C
from tests.conftest import make_settings
from training.labels import (
    L,
    build_category_labels,
    build_labels,
    replenishable_categories,
    split_calibration_holdout,
)

CUT1, CUT2 = date(2024, 2, 1), date(2024, 4, 15)
END = date(2024, 4, 30)  # last day of data; follow-up stops at 2024-05-01 00:00 UTC


def _ts(s: str) -> pd.Timestamp:
    return pd.Timestamp(s, tz="UTC")


def _tx() -> pd.DataFrame:
    rows = [
        # member, order, ts, item, category, amount, is_return
        ("A", "a1", "2024-01-10 10:00", "f1", "formula", 10.0, False),
        ("A", "a1", "2024-01-10 10:00", "t1", "toys", 5.0, False),
        ("A", "a2", "2024-02-01 00:00", "f1", "formula", 20.0, False),  # exactly at the cutoff: a label
        ("A", "r1", "2024-02-10 09:00", "t1", "toys", -5.0, True),  # a return is not a purchase
        ("A", "a3", "2024-02-20 12:00", "t1", "toys", 7.0, False),
        ("A", "a4", "2024-04-20 06:00", "f1", "formula", 3.0, False),
        ("B", "b1", "2024-01-15 08:00", "f1", "formula", 30.0, False),
        ("B", "b2", "2024-01-31 23:59:59.999999", "t1", "toys", 1.0, False),  # before the cutoff: a feature
        ("C", "c1", "2024-03-05 00:00", "f1", "formula", 12.0, False),
        ("C", "c2", "2024-05-03 00:00", "f1", "formula", 9.0, False),  # after END
    ]
    columns = [C.MEMBER_ID, C.ORDER_ID, C.TS, C.ITEM_ID, C.CATEGORY, C.AMOUNT, C.IS_RETURN]
    df = pd.DataFrame(rows, columns=columns)
    df[C.TS] = pd.to_datetime(df[C.TS], utc=True, format="ISO8601")
    df[C.QUANTITY] = np.where(df[C.IS_RETURN], -1.0, 1.0)
    df[C.DISCOUNT] = 0.0
    return df


def _members() -> pd.DataFrame:
    return pd.DataFrame({C.MEMBER_ID: ["A", "B", "C"],
                         C.JOINED_AT: pd.to_datetime(["2024-01-01", "2024-01-01", "2024-03-01"], utc=True)})


@pytest.fixture
def settings30(tmp_path):
    return make_settings(tmp_path / "home", lifecycle={"churn_horizon_days": 30})


def test_member_labels_exact(settings30) -> None:
    out = build_labels(_tx(), _members(), [CUT2, CUT1], settings30, end=END)
    assert out.attrs == {"horizon_days": 30, "spend_days": 365, "end": END}
    assert list(out[C.MEMBER_ID]) == ["A", "B", "A", "B", "C"]  # C joined after the first cutoff
    assert list(out[L.CUTOFF]) == [_ts("2024-02-01")] * 2 + [_ts("2024-04-15")] * 3
    first, second = out.iloc[:2], out.iloc[2:]
    # cutoff 1: window [02-01, 03-02) is inside the data
    assert first[L.LABEL_OBSERVABLE].all()
    assert first[L.CHURN].tolist() == [0, 1]
    assert first[L.ORDERS_NEXT_H].tolist() == [2, 0]  # a2 and a3; the return r1 is no order
    assert first[L.DAYS_TO_NEXT].tolist() == [0.0, 90.0]  # B censored at 05-01: 29 + 31 + 30 days
    assert first[L.NEXT_EVENT].tolist() == [True, False]
    # 365-day spend reaches past the end: not observable, NaN
    assert not first[L.SPEND_OBSERVABLE].any() and first[L.SPEND_NEXT].isna().all()
    # cutoff 2: 04-15 + 30 d is past the end, so churn is <NA> even for A, who bought on 04-20
    assert not second[L.LABEL_OBSERVABLE].any()
    assert second[L.CHURN].isna().all() and second[L.ORDERS_NEXT_H].isna().all()
    assert second[L.DAYS_TO_NEXT].tolist() == [5.25, 16.0, 16.0]  # C's order of 05-03 is after END
    assert second[L.NEXT_EVENT].tolist() == [True, False, False]
    assert str(out[L.CHURN].dtype) == "Int8"


def test_spend_window_and_default_end(settings30) -> None:
    tx = _tx()
    out = build_labels(tx, _members(), [CUT1], settings30, end=date(2025, 2, 1))
    assert out[L.SPEND_OBSERVABLE].all()
    # A: a2 20 + a3 7 + a4 3 (the return line is not netted); B: nothing after its 01-31 23:59 order
    assert out[L.SPEND_NEXT].tolist() == [30.0, 0.0]
    default = build_labels(tx, _members(), [CUT1], settings30)
    assert default.attrs["end"] == date(2024, 5, 3)  # the UTC date of the latest line
    assert default[L.DAYS_TO_NEXT].tolist() == [0.0, 93.0]  # censored at 05-04 00:00


def test_default_horizon_is_dormant_days(settings) -> None:
    out = build_labels(_tx(), _members(), [CUT1], settings, end=END)
    assert out.attrs["horizon_days"] == settings.lifecycle.dormant_days == 90
    # [02-01, 05-01) is exactly 90 days, the whole follow-up: still observable
    assert out[L.LABEL_OBSERVABLE].all()
    assert out[L.ORDERS_NEXT_H].tolist() == [3, 0]


def test_category_labels_exact() -> None:
    items = pd.DataFrame({C.ITEM_ID: ["f1", "t1"], C.CATEGORY: ["formula", "toys"],
                          C.REPLENISHABLE: [True, False]})
    cats = replenishable_categories(items)
    assert cats == ["formula"]
    out = build_category_labels(_tx(), _members(), [CUT1, CUT2], cats, end=END)
    assert list(out.columns) == [C.MEMBER_ID, C.CATEGORY, L.CUTOFF, L.CAT_DAYS_TO_NEXT, L.CAT_NEXT_EVENT]
    assert list(zip(out[C.MEMBER_ID], out[L.CUTOFF].dt.date, strict=True)) == [
        ("A", CUT1), ("B", CUT1), ("A", CUT2), ("B", CUT2), ("C", CUT2)]
    assert out[C.CATEGORY].unique().tolist() == ["formula"]
    assert out[L.CAT_DAYS_TO_NEXT].tolist() == [0.0, 90.0, 5.25, 16.0, 16.0]
    assert out[L.CAT_NEXT_EVENT].tolist() == [True, False, True, False, False]


def test_bad_input_is_named(settings30) -> None:
    tx = _tx()
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['amount'\]"):
        build_labels(tx.drop(columns=[C.AMOUNT]), _members(), [CUT1], settings30)
    naive = tx.assign(**{C.TS: tx[C.TS].dt.tz_localize(None)})
    with pytest.raises(ValueError, match="'ts' must be a timezone-aware UTC"):
        build_labels(naive, _members(), [CUT1], settings30)
    with pytest.raises(ValueError, match=r"absent from the members table, e.g. row 8, column 'member_id'"):
        build_labels(tx, _members().iloc[:2], [CUT1], settings30)
    with pytest.raises(ValueError, match="cutoff 2024-06-01 is after the end of the data"):
        build_labels(tx, _members(), [date(2024, 6, 1)], settings30, end=END)
    with pytest.raises(ValueError, match="has a time of day"):
        build_labels(tx, _members(), [pd.Timestamp("2024-02-01 12:00")], settings30)


def test_split_calibration_holdout() -> None:
    tx = _tx()
    s = split_calibration_holdout(tx, date(2024, 2, 15), date(2024, 4, 30), unit_days=1)
    assert list(s.index) == ["A", "B"]  # C bought only after the calibration period
    a, b = s.loc["A"], s.loc["B"]
    # A: purchase days 01-10, 02-01 (calibration); 02-20, 04-20 (holdout)
    assert (a[L.FREQUENCY_CAL], a[L.RECENCY_CAL], a[L.T_CAL]) == (1, 22.0, 35.0)
    assert a[L.MONETARY_CAL] == 20.0 and a[L.FREQUENCY_HOLDOUT] == 2 and a[L.MONETARY_HOLDOUT] == 5.0
    # B: days 01-15 and 01-31
    assert (b[L.FREQUENCY_CAL], b[L.RECENCY_CAL], b[L.T_CAL], b[L.FREQUENCY_HOLDOUT]) == (1, 16.0, 30.0, 0)
    assert s[L.DURATION_HOLDOUT].tolist() == [76.0, 76.0]
    weeks = split_calibration_holdout(tx, date(2024, 2, 15), date(2024, 4, 30), unit_days=7)
    assert weeks.loc["B", L.T_CAL] == pytest.approx(30 / 7)


def test_same_day_orders_are_one_purchase_period() -> None:
    tx = _tx()
    extra = tx.iloc[[6]].assign(**{C.ORDER_ID: "b0", C.TS: _ts("2024-01-15 20:00")})
    s = split_calibration_holdout(pd.concat([tx, extra]), date(2024, 2, 15), date(2024, 4, 30))
    assert s.loc["B", L.FREQUENCY_CAL] == 1


END_R = date(2024, 2, 4)


@pytest.mark.slow
def test_vectorised_labels_match_a_loop(settings30) -> None:
    rng = np.random.default_rng(3)
    n_members, n_orders = 300, 3000
    members = pd.DataFrame({C.MEMBER_ID: [f"m{i}" for i in range(n_members)],
                            C.JOINED_AT: pd.Timestamp("2023-01-01", tz="UTC")
                            + pd.to_timedelta(rng.integers(0, 200, n_members), unit="D")})
    mid = rng.integers(0, n_members, n_orders)
    seconds = rng.integers(0, 400 * 86400, n_orders)
    ts = pd.Timestamp("2023-01-01", tz="UTC") + pd.to_timedelta(seconds, unit="s")
    tx = pd.DataFrame({C.MEMBER_ID: members[C.MEMBER_ID].to_numpy()[mid],
                       C.ORDER_ID: [f"o{i}" for i in range(n_orders)], C.TS: ts, C.ITEM_ID: "x",
                       C.QUANTITY: 1.0, C.AMOUNT: rng.uniform(1, 50, n_orders).round(2)})
    cutoffs = [date(2023, 1, 1), date(2023, 5, 1), date(2023, 9, 1)]
    out = build_labels(tx, members, cutoffs, settings30, end=END_R).set_index([L.CUTOFF, C.MEMBER_ID])
    joined = members.set_index(C.MEMBER_ID)[C.JOINED_AT]
    for cut in cutoffs:
        c = pd.Timestamp(cut, tz="UTC")
        for m in members[C.MEMBER_ID]:
            if joined[m] >= c:
                assert (c, m) not in out.index
                continue
            row = out.loc[(c, m)]
            mine = tx[tx[C.MEMBER_ID] == m]
            future = mine[mine[C.TS] >= c]
            in_h = future[future[C.TS] < c + pd.Timedelta(days=30)]
            assert row[L.ORDERS_NEXT_H] == len(in_h)
            in_year = future[future[C.TS] < c + pd.Timedelta(days=365)]
            if row[L.SPEND_OBSERVABLE]:
                assert row[L.SPEND_NEXT] == pytest.approx(in_year[C.AMOUNT].sum())
            else:
                assert np.isnan(row[L.SPEND_NEXT])
                assert c + pd.Timedelta(days=365) > pd.Timestamp(END_R, tz="UTC")
            if len(future):
                assert row[L.NEXT_EVENT]
                assert row[L.DAYS_TO_NEXT] == pytest.approx((future[C.TS].min() - c) / pd.Timedelta(days=1))
            else:
                assert not row[L.NEXT_EVENT]
                assert row[L.DAYS_TO_NEXT] == (pd.Timestamp(END_R, tz="UTC") + pd.Timedelta(days=1) - c).days
