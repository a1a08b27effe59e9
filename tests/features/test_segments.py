"""RFM scores, segments and lifecycle stages on crafted members; distributions and transition counts."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from features.contract import C, F
from features.segments import (
    JOINED,
    LEFT,
    STAGES,
    Dist,
    SegmentInput,
    Stage,
    assign_segments,
    segment_distribution,
    segment_sql,
    transition_matrix,
)
from tests.conftest import make_settings

NAN = math.nan


def _member(mid: str, tenure: int, recency: float, orders: int, rfm_orders: int | None = None,
            rfm_spend: float = 0.0, last_gap: float = NAN) -> dict:
    return {C.MEMBER_ID: mid, F.TENURE_DAYS: tenure, F.RECENCY_DAYS: recency, F.ORDERS_TOTAL: orders,
            SegmentInput.RFM_ORDERS: orders if rfm_orders is None else rfm_orders,
            SegmentInput.RFM_SPEND: rfm_spend, SegmentInput.LAST_GAP_DAYS: last_gap}


def _population(triples: dict[str, tuple[int, int, int]]) -> list[dict]:
    """Five ranked members whose r/f/m are permutations of 1..5, so each score equals its rank."""
    return [_member(mid, 400, recency=6 - r, orders=f, rfm_spend=10.0 * m, last_gap=10.0)
            for mid, (r, f, m) in triples.items()]


def _scored(rows: list[dict], settings) -> pd.DataFrame:
    return assign_segments(pd.DataFrame(rows), settings).set_index(C.MEMBER_ID)


@pytest.mark.parametrize("triples, segments", [
    ({"p1": (5, 5, 5), "p2": (4, 3, 1), "p3": (3, 1, 2), "p4": (2, 4, 3), "p5": (1, 2, 4)},
     {"p1": "Champions", "p2": "Loyal", "p3": "Needs attention", "p4": "At risk", "p5": "Lost"}),
    ({"q1": (5, 1, 1), "q2": (4, 4, 3), "q3": (2, 2, 5), "q4": (3, 3, 2), "q5": (1, 5, 4)},
     {"q1": "Potential", "q2": "Loyal", "q3": "Hibernating", "q4": "Loyal", "q5": "At risk"}),
])
def test_segments_first_match_wins(settings, triples, segments):
    extra = [_member("new", 10, NAN, 0), _member("prospect", 100, NAN, 0),
             _member("gone", 800, 400.0, 3, rfm_orders=0, last_gap=50.0)]
    out = _scored(_population(triples) + extra, settings)
    for mid, (r, f, m) in triples.items():
        assert (out.loc[mid, F.RFM_R], out.loc[mid, F.RFM_F], out.loc[mid, F.RFM_M]) == (r, f, m), mid
        assert out.loc[mid, F.RFM_SEGMENT] == segments[mid], mid
    assert out.loc["new", F.RFM_SEGMENT] == "New"
    assert out.loc["prospect", F.RFM_SEGMENT] == "Prospect"
    # bought, but nothing in the RFM window: not scored, placed as (1, 1, 1)
    assert (out.loc["gone", F.RFM_R], out.loc["gone", F.RFM_F], out.loc["gone", F.RFM_M]) == (0, 0, 0)
    assert out.loc["gone", F.RFM_SEGMENT] == "Lost"
    assert out[F.RFM_R].dtype == "int64"


def test_rfm_scores_quantiles_and_ties(settings):
    rows = [_member(f"m{k}", 400, recency=float(k), orders=k, rfm_spend=100.0) for k in range(1, 11)]
    out = _scored(rows, settings)
    # rank k of 10 -> 1 + floor((k - 1) * 5 / 10)
    assert out[F.RFM_F].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert out[F.RFM_R].tolist() == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]  # recency 1 day = most recent = 5
    assert out[F.RFM_M].tolist() == [1] * 10  # all tied: the worst value scores 1
    tied = _scored([_member(f"t{k}", 400, 5.0, o, rfm_spend=float(o)) for k, o in enumerate([1, 1, 1, 2])],
                   settings)
    assert tied[F.RFM_F].tolist() == [1, 1, 1, 4]  # ties share the score of their lowest rank


def test_new_member_overrides_scores_and_unmatched_segment_is_null(tmp_path):
    s = make_settings(tmp_path, rfm={"segments": [{"name": "Top", "r": [5, 5], "f": [5, 5], "m": [5, 5]}]})
    out = _scored([_member("a", 5, 1.0, 3, rfm_spend=50.0), _member("b", 40, 9.0, 1, rfm_spend=5.0)], s)
    assert out.loc["a", F.RFM_SEGMENT] == "New"  # best scores, but joined 5 days ago
    assert out.loc["b", F.RFM_SEGMENT] is None  # no segment of the settings matches (1, 1, 1)


@pytest.mark.parametrize("tenure, recency, last_gap, stage", [
    (30, NAN, NAN, Stage.NEW),  # new_member_days is inclusive
    (30, 200.0, 5.0, Stage.NEW),
    (31, 5.0, 10.0, Stage.ACTIVE),
    (400, 89.99, 10.0, Stage.ACTIVE),
    (400, 90.0, 10.0, Stage.DORMANT),
    (400, 179.99, 10.0, Stage.DORMANT),
    (400, 180.0, 10.0, Stage.CHURNED),
    (400, 30.0, 90.0, Stage.REACTIVATED),  # recent purchase ended a dormant gap: both bounds inclusive
    (400, 30.01, 90.0, Stage.ACTIVE),
    (400, 30.0, 89.99, Stage.ACTIVE),
    (200, 10.0, 190.0, Stage.REACTIVATED),  # first purchase long after joining
    (89, NAN, NAN, Stage.ACTIVE),  # never bought: days inactive = tenure
    (90, NAN, NAN, Stage.DORMANT),
    (180, NAN, NAN, Stage.CHURNED),
])
def test_lifecycle_stage_rules(settings, tenure, recency, last_gap, stage):
    orders = 0 if math.isnan(recency) else 2
    out = _scored([_member("x", tenure, recency, orders, rfm_spend=1.0, last_gap=last_gap)], settings)
    assert out.loc["x", F.LIFECYCLE_STAGE] == stage


def test_lifecycle_follows_settings(tmp_path):
    s = make_settings(tmp_path, lifecycle={"dormant_days": 30, "churned_days": 60, "new_member_days": 7})
    out = _scored([_member("x", 100, 45.0, 2, last_gap=5.0)], s)
    assert out.loc["x", F.LIFECYCLE_STAGE] == Stage.DORMANT


def test_assign_segments_names_missing_columns(settings):
    with pytest.raises(KeyError, match=SegmentInput.LAST_GAP_DAYS):
        assign_segments(pd.DataFrame([_member("x", 1, 1.0, 1)]).drop(columns=[SegmentInput.LAST_GAP_DAYS]),
                        settings)


def test_segment_sql_is_the_one_used_in_features_and_quotes_names(tmp_path):
    s = make_settings(tmp_path, rfm={"new_segment": "Brand 'new'", "segments": [
        {"name": "All", "r": [1, 5], "f": [1, 5], "m": [1, 5]}]})
    assert "'Brand ''new'''" in segment_sql(s, "t")
    out = _scored([_member("a", 3, NAN, 0)], s)
    assert out.loc["a", F.RFM_SEGMENT] == "Brand 'new'"


def _snapshot(stages: dict[str, str], segments: dict[str, str] | None = None) -> pd.DataFrame:
    return pd.DataFrame({C.MEMBER_ID: list(stages), F.LIFECYCLE_STAGE: list(stages.values()),
                         F.RFM_SEGMENT: list((segments or dict.fromkeys(stages, "Lost")).values())})


def test_segment_distribution_counts_and_shares(settings):
    snap = _snapshot({"a": "active", "b": "active", "c": "churned", "d": "new"},
                     {"a": "Champions", "b": "Champions", "c": "Lost", "d": "New"})
    dist = segment_distribution(snap, settings).set_index([Dist.KIND, Dist.NAME])
    assert dist.loc[("segment", "Champions"), Dist.MEMBERS] == 2
    assert dist.loc[("segment", "Champions"), Dist.SHARE] == 0.5
    assert dist.loc[("segment", "Loyal"), Dist.MEMBERS] == 0
    assert dist.loc[("stage", "churned"), Dist.SHARE] == 0.25
    assert dist.loc[("stage", "reactivated"), Dist.MEMBERS] == 0
    assert dist.xs("segment")[Dist.MEMBERS].sum() == 4
    assert list(dist.xs("stage").index) == list(STAGES)
    assert list(dist.xs("segment").index) == list(settings.rfm.segment_names)
    two = pd.concat([snap.assign(**{C.AS_OF: 1}), snap.iloc[:1].assign(**{C.AS_OF: 2})])
    per_date = segment_distribution(two, settings)
    assert per_date.groupby([C.AS_OF, Dist.KIND])[Dist.MEMBERS].sum().tolist() == [4, 4, 1, 1]


def test_transition_matrix_counts(settings):
    a = _snapshot({"m1": "new", "m2": "active", "m3": "active", "m4": "dormant", "m5": "churned"})
    b = _snapshot({"m1": "active", "m2": "active", "m3": "dormant", "m4": "reactivated", "m5": "churned",
                   "m6": "new", "m7": "new"})
    t = transition_matrix(a, b)
    assert list(t.index) == [*STAGES, JOINED]
    assert list(t.columns) == [*STAGES, LEFT]
    assert t.loc["new", "active"] == 1
    assert t.loc["active", "active"] == 1
    assert t.loc["active", "dormant"] == 1
    assert t.loc["dormant", "reactivated"] == 1
    assert t.loc["churned", "churned"] == 1
    assert t.loc[JOINED, "new"] == 2
    assert t.to_numpy().sum() == 7
    assert t[LEFT].sum() == 0
    gone = transition_matrix(b, a)
    assert gone.loc["new", LEFT] == 2
    with pytest.raises(ValueError, match="duplicate"):
        transition_matrix(pd.concat([a, a]), b)
