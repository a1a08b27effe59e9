"""Training sets: one row per observable label, features only from Feast and only from before the cutoff."""

from __future__ import annotations

from datetime import date, timedelta
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest

from features.contract import C, F
from features.lake import MEMBER_VIEW, snapshot_path
from training.dataset import (
    TrainingSetError,
    build_training_set,
    data_fingerprint,
    default_cutoffs,
    read_lake_table,
    service_features,
)
from training.labels import L, build_labels


def test_data_fingerprint_changes_with_any_value() -> None:
    a = pd.DataFrame({C.MEMBER_ID: ["M1", "M2"], F.RECENCY_DAYS: [3.0, np.nan]})
    assert data_fingerprint(a) == data_fingerprint(a.copy())
    b = a.copy()
    b.loc[1, F.RECENCY_DAYS] = 4.0
    assert data_fingerprint(b) != data_fingerprint(a)
    assert data_fingerprint(a.rename(columns={F.RECENCY_DAYS: F.TENURE_DAYS})) != data_fingerprint(a)


@pytest.mark.slow
def test_default_cutoffs_are_snapshots_with_observed_labels(demo_workspace) -> None:
    settings, _ = demo_workspace
    cutoffs = default_cutoffs(settings, n=3, every_days=28)
    assert len(cutoffs) == 3 and cutoffs == sorted(cutoffs)
    assert all((b - a).days >= 28 for a, b in pairwise(cutoffs))
    last_day = read_lake_table(settings, "transactions")[C.TS].max().date()
    for c in cutoffs:
        assert snapshot_path(settings, MEMBER_VIEW, c.isoformat()).exists()
        assert c + timedelta(days=settings.lifecycle.horizon_days) <= last_day + timedelta(days=1)
    # the latest one is as late as it can be: the next weekly snapshot would leave the window unobserved
    nxt = cutoffs[-1] + timedelta(days=settings.features.snapshot_every_days)
    assert nxt + timedelta(days=settings.lifecycle.horizon_days) > last_day + timedelta(days=1)


@pytest.mark.slow
def test_training_set_has_one_row_per_label_and_point_in_time_features(demo_workspace) -> None:
    settings, _ = demo_workspace
    cutoffs = default_cutoffs(settings, n=2, every_days=28)
    frame = build_training_set(settings, cutoffs, "churn_v1")

    labels = build_labels(read_lake_table(settings, "transactions"), read_lake_table(settings, "members"),
                          cutoffs, settings)
    assert len(frame) == int(labels[L.LABEL_OBSERVABLE].sum()) == len(labels) > 1000
    assert not frame.duplicated([C.MEMBER_ID, C.EVENT_TIMESTAMP]).any()
    assert (frame[C.EVENT_TIMESTAMP] == frame[L.CUTOFF]).all()
    assert sorted(frame[C.EVENT_TIMESTAMP].dt.date.unique()) == cutoffs
    assert frame[L.CHURN].notna().all() and set(frame[L.CHURN].unique()) == {0, 1}
    feats = service_features(settings, "churn_v1")
    assert frame.attrs["features"] == feats and list(frame.columns[-len(feats):]) == feats
    assert frame.attrs["fingerprint"] == data_fingerprint(frame)

    # every feature value is the snapshot as of the cutoff itself (data strictly before it), never a later one
    for cut in cutoffs:
        part = frame[frame[C.EVENT_TIMESTAMP].dt.date == cut].set_index(C.MEMBER_ID)
        snap = pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, cut.isoformat())).set_index(C.MEMBER_ID)
        snap = snap.loc[part.index]
        for col in (F.TENURE_DAYS, F.RECENCY_DAYS, F.ORDERS_TOTAL, F.SPEND_TOTAL, F.RECENCY_GAP_RATIO):
            np.testing.assert_allclose(part[col].to_numpy(float), snap[col].to_numpy(float), err_msg=col)
        assert (part[F.RFM_SEGMENT] == snap[F.RFM_SEGMENT]).all()
        # and recency is the days since the member's last purchase (not a return) before the cutoff
        tx = read_lake_table(settings, "transactions")
        before = tx[(tx[C.TS] < pd.Timestamp(cut, tz="UTC")) & ~tx[C.IS_RETURN].astype(bool)]
        last = before.groupby(C.MEMBER_ID)[C.TS].max()
        days = (pd.Timestamp(cut, tz="UTC") - last.reindex(part.index)).dt.total_seconds() / 86400
        ok = days.notna()
        np.testing.assert_allclose(part.loc[ok, F.RECENCY_DAYS], days[ok], atol=1.0)


@pytest.mark.slow
def test_unobservable_cutoff_is_refused_not_dropped(demo_workspace) -> None:
    settings, _ = demo_workspace
    last_day = read_lake_table(settings, "transactions")[C.TS].max().date()
    late = last_day - timedelta(days=10)
    with pytest.raises(TrainingSetError, match="not observable"):
        build_training_set(settings, [late], "churn_v1")
    with pytest.raises(ValueError, match="at least one cutoff"):
        build_training_set(settings, [], "churn_v1")
    assert default_cutoffs(settings, n=1)[0] < late
    assert isinstance(late, date)


@pytest.mark.slow
def test_a_bounded_training_set_samples_members_before_the_join(demo_workspace) -> None:
    settings, _ = demo_workspace
    cutoffs = default_cutoffs(settings, n=2, every_days=28)
    full = build_training_set(settings, cutoffs)
    bounded = build_training_set(settings, cutoffs, max_rows=len(full) // 3)
    assert len(bounded) == len(full) // 3
    # the rows kept are exactly the full set's rows for the same (member, cutoff) pairs, features included
    key = [C.MEMBER_ID, C.EVENT_TIMESTAMP]
    merged = bounded.merge(full, on=key, suffixes=("", "_full"), validate="one_to_one")
    assert len(merged) == len(bounded)
    assert np.allclose(merged[F.RECENCY_DAYS], merged[f"{F.RECENCY_DAYS}_full"], equal_nan=True)
    # whole members: at most one member (at the boundary) lacks one of its cutoffs
    per_member = bounded.groupby(C.MEMBER_ID).size()
    full_per_member = full.groupby(C.MEMBER_ID).size().reindex(per_member.index)
    assert (per_member != full_per_member).sum() <= 1


def test_a_lake_session_reads_each_table_once_and_builds_the_same_sets(demo_workspace, monkeypatch) -> None:
    import training.dataset as ds

    settings, _ = demo_workspace
    cutoffs = default_cutoffs(settings, n=2, every_days=28)
    outside = build_training_set(settings, cutoffs)
    reads, builds = [], []
    real_read, real_build = ds._read_lake_table, ds.build_labels
    monkeypatch.setattr(ds, "_read_lake_table", lambda glob, table, cols: reads.append(table) or
                        real_read(glob, table, cols))
    monkeypatch.setattr(ds, "build_labels", lambda *a, **k: builds.append(a[2]) or real_build(*a, **k))
    with ds.lake_session():
        first = build_training_set(settings, cutoffs)
        again = build_training_set(settings, cutoffs, "next_purchase_v1")
        ts = read_lake_table(settings, "transactions", columns=[C.TS])
        other = build_training_set(settings, cutoffs[:1])
    assert sorted(reads) == ["members", "transactions"]  # the column subset came from the whole table
    assert len(builds) == 2  # cutoffs, then cutoffs[:1]; the second service reused the first labels
    pd.testing.assert_frame_equal(first, outside)
    assert first.attrs["fingerprint"] == outside.attrs["fingerprint"]
    assert len(again) == len(first) and list(ts.columns) == [C.TS]
    assert len(other) == (first[C.EVENT_TIMESTAMP] == first[C.EVENT_TIMESTAMP].min()).sum()
    # the session is closed: the next read goes to the lake again
    read_lake_table(settings, "members")
    assert reads[-1] == "members" and len(reads) == 3
