"""The scores partition: written whole or not at all, read back as it was written, found only when the
served versions and the snapshot date match."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from features.contract import C
from features.definitions import SCORES_ONLINE_FILE, SCORES_SCHEMA
from tests.conftest import make_settings
from training.next_purchase import NP
from training.recommend import RC
from training.scores import (
    MANIFEST_FILE,
    MEMBERS_FILE,
    RECS_FILE,
    SC,
    ScoreTable,
    latest_scores,
    np_column,
    partition,
    score_dates,
    score_members,
    write_scores,
)

DAY = date(2025, 12, 31)
VERSIONS = {"churn": "3", "next_purchase": "2", "value": "2", "recommend": "5"}


def _members(ids: list[str]) -> pd.DataFrame:
    k = len(ids)
    out = {SC.MEMBER_ID: ids, SC.CHURN_P: np.linspace(0.1, 0.9, k), SC.CHURN_BAND: ["low"] * k,
           SC.REASONS: [[f"no purchase for {i} days"] for i in range(k)], SC.VALUE: np.arange(k, dtype=float),
           SC.RFM_SEGMENT: ["Champions"] * (k - 1) + [None], SC.LIFECYCLE_STAGE: ["active"] * k}
    for c in SC.NP_COLUMNS:
        out[c] = np.full(k, np.nan) if c == np_column(NP.LOWER_DAYS) else np.arange(k, dtype=float)
    return pd.DataFrame(out)


def _recs(ids: list[str], n: int) -> pd.DataFrame:
    rows = [{RC.MEMBER_ID: m, RC.RANK: r, RC.ITEM_ID: f"I{(i + r) % 7}", RC.SCORE: 1.0 / r, RC.SOURCE: "als",
             RC.BECAUSE: None if r % 2 else "I9", RC.REASON: "liked by members who buy what you buy",
             RC.COLD_START: False} for i, m in enumerate(ids) for r in range(n, 0, -1)]  # ranks reversed on purpose
    frame = pd.DataFrame(rows)
    frame[RC.BECAUSE] = frame[RC.BECAUSE].astype("string")
    return frame


def test_partition_round_trips_and_is_found_only_for_the_versions_and_date(tmp_path) -> None:
    s = make_settings(tmp_path / "home")
    ids = ["M3", "M1", "M2"]
    write_scores(s, DAY, _members(ids), _recs(ids, 3), {"versions": VERSIONS, "recommend_n": 3})
    assert score_dates(s) == [DAY]
    assert latest_scores(s, VERSIONS, DAY) is not None
    assert latest_scores(s, {**VERSIONS, "churn": "4"}, DAY) is None  # other models: answer live
    assert latest_scores(s, VERSIONS, date(2026, 1, 7)) is None  # a newer snapshot than the scores
    assert latest_scores(s, VERSIONS, None) is None
    t = ScoreTable.load(s, DAY)
    assert t.rec_n == 3 and t.versions == VERSIONS
    k = t.row["M1"]
    assert t.members[SC.CHURN_P][k] == pytest.approx(0.5)
    assert t.reasons[k] == ["no purchase for 1 days"]
    assert np.isnan(t.members[np_column(NP.LOWER_DAYS)][k])
    assert t.members[SC.RFM_SEGMENT][t.row["M2"]] is None
    lo, hi = t.rec_start[k], t.rec_start[k + 1]
    assert t.recs[RC.RANK][lo:hi].tolist() == [1, 2, 3]  # ordered by rank whatever the file's order
    assert t.recs[RC.ITEM_ID][lo:hi].tolist() == ["I2", "I3", "I4"]
    assert t.recs[RC.BECAUSE][lo:hi].tolist() == [None, "I9", None]


def test_a_failed_write_leaves_the_previous_partition_untouched(tmp_path) -> None:
    s = make_settings(tmp_path / "home")
    ids = ["M1", "M2"]
    target = write_scores(s, DAY, _members(ids), _recs(ids, 2), {"versions": VERSIONS, "recommend_n": 2})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    broken = _recs(ids, 2).drop(columns=[RC.REASON])  # the members file is written, then this fails
    with pytest.raises(KeyError, match=RC.REASON):
        write_scores(s, DAY, _members(["M1", "M2", "M3"]), broken, {"versions": VERSIONS, "recommend_n": 2})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary left behind
    assert sorted(before) == sorted([MANIFEST_FILE, MEMBERS_FILE, RECS_FILE, SCORES_ONLINE_FILE])


def test_the_online_rows_flatten_the_answers(tmp_path) -> None:
    s = make_settings(tmp_path / "home")
    ids = ["M2", "M1"]
    recs = _recs(ids, 12).iloc[::-1]  # any order in, ranked out
    target = write_scores(s, DAY, _members(ids), recs, {"versions": VERSIONS, "recommend_n": 12})
    online = pq.read_table(target / SCORES_ONLINE_FILE).to_pandas().set_index(C.MEMBER_ID)
    assert list(online.columns) == [C.AS_OF, *SCORES_SCHEMA]
    for m in ids:
        want = recs[(recs[RC.MEMBER_ID] == m) & (recs[RC.RANK] <= s.recommend.n)].sort_values(RC.RANK)
        assert online.loc[m, "recommended_items"] == ",".join(want[RC.ITEM_ID])
        assert online.loc[m, "scored_by"] == ",".join(f"{k}={v}" for k, v in sorted(VERSIONS.items()))
    members = _members(ids).set_index(SC.MEMBER_ID)
    assert online.loc["M1", "churn_reasons"] == "; ".join(members.loc["M1", SC.REASONS])
    assert (online[C.AS_OF] == pd.Timestamp(DAY, tz="UTC")).all()


def test_same_rows_give_the_same_files(tmp_path) -> None:
    s = make_settings(tmp_path / "home")
    ids = ["M1", "M2"]
    first = write_scores(s, DAY, _members(ids), _recs(ids, 2), {"versions": VERSIONS})
    a = {n: (first / n).read_bytes() for n in (MEMBERS_FILE, RECS_FILE)}
    second = write_scores(s, DAY, _members(ids), _recs(ids, 2), {"versions": VERSIONS})
    assert second == partition(s, DAY)
    assert {n: (second / n).read_bytes() for n in (MEMBERS_FILE, RECS_FILE)} == a


def test_scoring_refuses_a_member_twice(tmp_path) -> None:
    s = make_settings(tmp_path / "home")
    features = pd.DataFrame({C.MEMBER_ID: ["M1", "M2", "M1"]})
    with pytest.raises(ValueError, match="member 'M1' more than once"):
        score_members(s, None, None, None, None, features, n=3)  # type: ignore[arg-type]
