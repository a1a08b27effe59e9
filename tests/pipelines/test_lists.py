"""Marketer lists from a scores partition: each filter does what it says, top N by value at risk, the
treatment rules, a reproducible holdout, CSV and XLSX with the campaign log recorded, bad options named."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest

from features.contract import FC, C
from features.lake import MEMBER_CATEGORY_VIEW, snapshot_path
from pipelines.lists import (
    PERKS,
    REMINDER,
    SECOND_ORDER,
    WIN_BACK,
    L,
    ListError,
    ListFilters,
    build_list,
    export_list,
    holdout_arms,
)
from tests.conftest import make_settings
from training.next_purchase import NP
from training.recommend import RC
from training.scores import SC, np_column, write_scores

DAY = date(2025, 12, 31)
VERSIONS = {"churn": "3", "next_purchase": "2", "value": "2", "recommend": "5"}
STAGES = ["new", "active", "dormant", "churned", "reactivated"]


@pytest.fixture
def scored(tmp_path):
    s = make_settings(tmp_path / "home")
    n = 200
    rng = np.random.default_rng(3)
    ids = [f"M{i:04d}" for i in range(n)]
    p = rng.uniform(0.01, 0.99, n)
    value = np.round(rng.gamma(2.0, 50.0, n), 2)
    members = pd.DataFrame({
        SC.MEMBER_ID: ids, SC.CHURN_P: p, SC.CHURN_BAND: np.where(p >= 0.6, "high", np.where(p >= 0.3, "medium",
                                                                                             "low")),
        SC.REASONS: [["no purchase for 40 days", "spend down 20% on the previous 90 days"]] * n,
        SC.VALUE: value, SC.RFM_SEGMENT: [("Champions", "Loyal", "At risk", "Hibernating")[i % 4] for i in range(n)],
        SC.LIFECYCLE_STAGE: [STAGES[i % 5] for i in range(n)]})
    for c in SC.NP_COLUMNS:
        members[c] = 10.4 if c != np_column(NP.BEYOND_HORIZON) else 0.0
    recs = pd.DataFrame([{RC.MEMBER_ID: m, RC.RANK: r, RC.ITEM_ID: f"I{r:03d}", RC.SCORE: 1 / r, RC.SOURCE: "als",
                          RC.BECAUSE: None, RC.REASON: "popular now", RC.COLD_START: False}
                         for m in ids for r in range(1, 6)])
    recs[RC.BECAUSE] = recs[RC.BECAUSE].astype("string")
    write_scores(s, DAY, members, recs, {"versions": VERSIONS, "recommend_n": 5})
    cat = pd.DataFrame({C.MEMBER_ID: ids[:10], C.CATEGORY: "formula", FC.CAT_ORDERS: 3, FC.CAT_SPEND_SHARE: 0.2,
                        FC.CAT_RECENCY_DAYS: 20.0, FC.CAT_GAP_MEAN_DAYS: 21.0, FC.CAT_GAP_STD_DAYS: 1.0,
                        FC.CAT_DUE_RATIO: [1.2, 0.95, 0.5, 1.0, 0.1, 0.79, 0.81, 2.0, 0.0, np.nan],
                        FC.CAT_REPLENISHABLE: [True] * 7 + [False, True, True], "as_of": pd.Timestamp(DAY)})
    path = snapshot_path(s, MEMBER_CATEGORY_VIEW, DAY.isoformat())
    path.parent.mkdir(parents=True, exist_ok=True)
    cat.to_parquet(path)
    return s, members


def test_filters_select_exactly_the_members_they_name(scored) -> None:
    s, m = scored
    out, man = build_list(s, ListFilters(stages=("dormant", "churned"), bands=("high",), min_value=50.0), "winback")
    want = m[m[SC.LIFECYCLE_STAGE].isin(["dormant", "churned"]) & (m[SC.CHURN_BAND] == "high") & (m[SC.VALUE] >= 50)]
    assert set(out[L.MEMBER_ID]) == set(want[SC.MEMBER_ID]) and len(out) == len(want) > 0
    assert man["members"] == len(out) and man["filters"]["stages"] == ("dormant", "churned")
    seg, _ = build_list(s, ListFilters(segments=("At risk",)), "seg")
    assert set(seg[L.SEGMENT]) == {"At risk"} and len(seg) == 50
    due, _ = build_list(s, ListFilters(category_due="formula"), "due")  # due ratio >= 0.8 and replenishable
    assert sorted(due[L.MEMBER_ID]) == ["M0000", "M0001", "M0003", "M0006"]


def test_top_n_is_by_value_at_risk_with_reasons_items_and_dates(scored) -> None:
    s, m = scored
    out, _ = build_list(s, ListFilters(top=15), "top")
    at_risk = (m[SC.CHURN_P] * m[SC.VALUE]).sort_values(ascending=False)
    assert list(out[L.MEMBER_ID]) == list(m.loc[at_risk.index[:15], SC.MEMBER_ID])
    assert out[L.AT_RISK].is_monotonic_decreasing
    assert out[L.ITEMS].iloc[0] == "I001, I002, I003"
    assert out[L.REASONS].iloc[0] == "no purchase for 40 days; spend down 20% on the previous 90 days"
    assert out[L.NEXT_PURCHASE].iloc[0] == "2026-01-10"  # as_of + floor(10.4 days)


def test_treatment_follows_value_then_stage(scored) -> None:
    s, m = scored
    out, man = build_list(s, ListFilters(), "all")
    high = m[SC.VALUE].quantile(s.lists.high_value_quantile)
    row = out.set_index(L.MEMBER_ID)
    value = m.set_index(SC.MEMBER_ID)[SC.VALUE]
    stage = m.set_index(SC.MEMBER_ID)[SC.LIFECYCLE_STAGE]
    segment = m.set_index(SC.MEMBER_ID)[SC.RFM_SEGMENT]
    for member, t in row[L.TREATMENT].items():
        if value[member] >= high or segment[member] in s.lists.vip_segments:
            assert t == PERKS
        elif stage[member] == "new":
            assert t == SECOND_ORDER
        elif stage[member] in ("dormant", "churned"):
            assert t == WIN_BACK
        else:
            assert t == REMINDER
    assert set(row[L.TREATMENT]) == {PERKS, SECOND_ORDER, WIN_BACK, REMINDER}
    assert man["high_value_threshold"] == pytest.approx(high, abs=0.01)


def test_holdout_is_reproducible_and_exactly_the_share(scored) -> None:
    s, _ = scored
    a, man = build_list(s, ListFilters(), "spring", holdout_share=0.2, seed=11)
    b, _ = build_list(s, ListFilters(), "spring", holdout_share=0.2, seed=11)
    assert a[[L.MEMBER_ID, L.ARM]].equals(b[[L.MEMBER_ID, L.ARM]])
    assert (a[L.ARM] == "holdout").sum() == 40 == man["holdout"]
    shuffled = a[L.MEMBER_ID].sample(frac=1.0, random_state=5)
    again = dict(zip(shuffled, holdout_arms(shuffled, "spring", 0.2, 11), strict=True))
    assert all(again[m] == arm for m, arm in zip(a[L.MEMBER_ID], a[L.ARM], strict=True))  # not by row order
    other, _ = build_list(s, ListFilters(), "spring", holdout_share=0.2, seed=12)
    assert not other[L.ARM].equals(a[L.ARM])  # another seed, another draw


def test_export_writes_csv_and_xlsx_and_records_the_campaign_log(scored, tmp_path) -> None:
    s, _ = scored
    frame, man = build_list(s, ListFilters(stages=("new",)), "welcome", holdout_share=0.1)
    sent = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    rep = export_list(s, frame, man, tmp_path / "welcome.csv", sent_at=sent)
    back = pd.read_csv(tmp_path / "welcome.csv")
    assert list(back.columns) == list(L.COLUMNS) and len(back) == len(frame) == 40
    log = pd.read_parquet(rep["campaign_log"])
    assert set(log[C.CAMPAIGN_ID]) == {"welcome"} and log[C.MEMBER_ID].tolist() == frame[L.MEMBER_ID].tolist()
    assert log[C.ARM].tolist() == frame[L.ARM].tolist() and (log[C.SENT_AT] == pd.Timestamp(sent)).all()
    recorded = json.loads((s.dirs.outputs / "lists" / "welcome" / "manifest.json").read_text())
    assert recorded["holdout"] == 4 and recorded["models"] == VERSIONS
    export_list(s, frame, man, tmp_path / "welcome.xlsx", sent_at=sent)
    xl = pd.read_excel(tmp_path / "welcome.xlsx", sheet_name=None)
    assert xl["list"][L.MEMBER_ID].tolist() == frame[L.MEMBER_ID].tolist()
    assert "holdout_share" in set(xl["about"]["key"])
    with pytest.raises(ListError, match=r"\.csv or \.xlsx"):
        export_list(s, frame, man, tmp_path / "welcome.txt")
    assert not (tmp_path / "welcome.txt").exists()


@pytest.mark.parametrize(("filters", "kwargs", "message"), [
    (ListFilters(stages=("sleeping",)), {}, "--stage 'sleeping'"),
    (ListFilters(segments=("VIP",)), {}, "--segment 'VIP'"),
    (ListFilters(bands=("extreme",)), {}, "--band 'extreme'"),
    (ListFilters(top=0), {}, "--top must be at least 1"),
    (ListFilters(category_due="caviar"), {}, "no member bought category 'caviar'"),
    (ListFilters(), {"as_of": date(2026, 2, 1)}, "--as-of 2026-02-01: no scores"),
    (ListFilters(), {"holdout_share": 1.0}, r"holdout share must be in \[0, 1\)"),
])
def test_bad_options_are_named(scored, filters, kwargs, message) -> None:
    s, _ = scored
    with pytest.raises(ListError, match=message):
        build_list(s, filters, "x", **kwargs)


def test_no_scores_says_what_to_run(tmp_path) -> None:
    with pytest.raises(ListError, match="run `repurchase score` first"):
        build_list(make_settings(tmp_path / "home"), ListFilters(), "x")


def test_cli_exports_a_list_and_reports_a_campaign(scored, tmp_path) -> None:
    from typer.testing import CliRunner

    from pipelines.cli import app

    s, _ = scored
    runner = CliRunner()
    env = {"REPURCHASE_HOME": str(s.dirs.home), "COLUMNS": "200"}
    res = runner.invoke(app, ["lists", "export", "--name", "wb-1", "--out", str(tmp_path / "wb.csv"), "--stage",
                              "dormant", "--stage", "churned", "--top", "30", "--sent-at", "2025-12-20T09:00",
                              "--json"], env=env)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output.strip().splitlines()[-1])
    assert rep["members"] == 30 and rep["holdout"] == 3 and rep["sent_at"] == "2025-12-20T09:00:00+00:00"
    assert set(pd.read_csv(tmp_path / "wb.csv")[L.STAGE]) <= {"dormant", "churned"}
    bad = runner.invoke(app, ["lists", "export", "--name", "wb-1", "--out", str(tmp_path / "x.csv"), "--band", "hot"],
                        env=env)
    assert bad.exit_code == 2 and "--band 'hot'" in bad.output and not (tmp_path / "x.csv").exists()
    # the recorded campaign log against purchases after the send (the lake's transactions table)
    lines = pd.DataFrame({C.MEMBER_ID: pd.read_csv(tmp_path / "wb.csv")[L.MEMBER_ID].iloc[:10].astype(str),
                          C.ORDER_ID: [f"O{i}" for i in range(10)], C.TS: pd.Timestamp("2025-12-22", tz="UTC"),
                          C.ITEM_ID: "I001", C.CATEGORY: "cake", C.QUANTITY: 1.0, C.AMOUNT: 12.0, C.DISCOUNT: 0.0,
                          C.IS_RETURN: False})
    (s.dirs.lake / "transactions" / "month=2025-12").mkdir(parents=True)
    lines.to_parquet(s.dirs.lake / "transactions" / "month=2025-12" / "part-0.parquet")
    res = runner.invoke(app, ["campaigns", "report", "--log", rep["campaign_log"], "--json"], env=env)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output.strip().splitlines()[-1])["campaigns"]
    arm = pd.read_parquet(rep["campaign_log"]).set_index(C.MEMBER_ID)[C.ARM]
    t_buy = sum(arm[m] == "treatment" for m in lines[C.MEMBER_ID])
    h_buy = sum(arm[m] == "holdout" for m in lines[C.MEMBER_ID])
    r7 = next(r for r in rows if r["window_days"] == 7)
    assert r7["campaign_id"] == "wb-1" and r7["n_treatment"] == 27 and r7["n_holdout"] == 3
    assert r7["rate_treatment"] == pytest.approx(t_buy / 27) and r7["rate_holdout"] == pytest.approx(h_buy / 3)
    missing = runner.invoke(app, ["campaigns", "report", "--log", rep["campaign_log"], "--campaign", "nope"], env=env)
    assert missing.exit_code == 2 and "--campaign nope: not in the log" in missing.output
