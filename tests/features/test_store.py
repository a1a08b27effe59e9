"""The Feast repo: config per profile, apply, point-in-time training frames, online reads."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.contract import C, DType
from features.definitions import SCORES_SCHEMA
from features.lake import ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW, atomic_path, snapshot_path
from features.settings import Settings
from tests.conftest import make_settings

CATEGORIES = ("baby", "beauty", "grocery", "home")
STRINGS = np.array(["Champions", "At risk", "", "né à Zürich", "x" * 200], dtype=object)


def _column(rng: np.random.Generator, dtype: DType, n: int, nulls: bool) -> pa.Array:
    null = rng.random(n) < (0.2 if nulls else 0.0)
    if dtype == "int":
        return pa.array(rng.integers(-(2**40), 2**40, n) // rng.choice([1, 2**30, 2**39], n), pa.int64())
    if dtype == "float":
        vals = rng.normal(0, 100, n)
        vals[rng.random(n) < 0.1] = 0.0
        vals[rng.random(n) < 0.05] = np.inf
        return pa.array(np.where(null, np.nan, vals), pa.float64())
    if dtype == "bool":
        return pa.array(rng.random(n) < 0.5, pa.bool_(), mask=null)
    return pa.array(STRINGS[rng.integers(0, len(STRINGS), n)].tolist(), pa.string(), mask=null)


def write_snapshot(settings: Settings, view: str, as_of: str, n: int, seed: int = 0,
                   nulls: bool = True) -> pa.Table:
    """A random snapshot of ``view`` at ``as_of`` with ``n`` rows and the contract's exact schema."""
    from features.definitions import VIEW_KEYS, view_schema

    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {}
    if view == MEMBER_CATEGORY_VIEW:
        members = max(1, n // len(CATEGORIES) + 1)
        pairs = [(f"M{m:06d}", c) for m in range(members) for c in CATEGORIES][:n]
        cols[C.MEMBER_ID] = pa.array([p[0] for p in pairs], pa.string())
        cols[C.CATEGORY] = pa.array([p[1] for p in pairs], pa.string())
    else:
        prefix = "M" if view == MEMBER_VIEW else "I"
        cols[VIEW_KEYS[view][0]] = pa.array([f"{prefix}{i:06d}" for i in range(n)], pa.string())
    day = pd.Timestamp(as_of, tz="UTC")
    cols[C.AS_OF] = pa.array([day] * n, pa.timestamp("us", tz="UTC"))
    for name, dtype in view_schema(settings, view).items():
        cols[name] = _column(rng, dtype, n, nulls)
    table = pa.table(cols)
    target = snapshot_path(settings, view, as_of)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return table


@pytest.fixture
def fresh(tmp_path: Path) -> Settings:
    """Settings with a unique Feast project (the store cache is keyed by settings)."""
    return make_settings(tmp_path / "home", feast={"project": f"t_{uuid.uuid4().hex[:10]}"})


def test_repo_config_per_profile(fresh: Settings) -> None:
    from features.store import repo_config

    emb = repo_config(fresh)
    assert emb.online_store.type == "sqlite"
    assert emb.online_store.path == str(fresh.dirs.feast / "online_store.db")
    assert emb.registry.registry_type == "file"
    assert emb.registry.path == str(fresh.dirs.feast / "registry.db")
    assert emb.offline_store.type == "duckdb"
    assert emb.entity_key_serialization_version == 3

    prod = repo_config(fresh.model_copy(update={"profile": "production"}))
    assert prod.online_store.type == "redis"
    assert prod.online_store.connection_string == fresh.feast.redis_connection
    assert prod.registry.registry_type == "sql"
    assert prod.registry.path == fresh.feast.registry_url
    assert prod.offline_store.type == "duckdb"


def test_definitions_follow_the_contract(fresh: Settings) -> None:
    from feast.types import Bool, Float64, Int64, String

    from features.contract import FC, FI, F, member_feature_schema
    from features.definitions import build_definitions, view_ttl

    defs = build_definitions(fresh)
    member = defs.views[MEMBER_VIEW]
    assert [f.name for f in member.features] == list(member_feature_schema(fresh.features.windows_days))
    types = {f.name: f.dtype for f in member.features}
    assert types[F.TENURE_DAYS] == Int64 and types[F.RECENCY_DAYS] == Float64
    assert types[F.RFM_SEGMENT] == String
    assert {f.name: f.dtype for f in defs.views[MEMBER_CATEGORY_VIEW].features}[FC.CAT_REPLENISHABLE] == Bool
    assert {f.name: f.dtype for f in defs.views[ITEM_VIEW].features}[FI.ITEM_PRICE] == Float64
    assert defs.views[MEMBER_CATEGORY_VIEW].join_keys == [C.MEMBER_ID, C.CATEGORY]
    assert member.ttl == view_ttl(fresh) == pd.Timedelta(days=9)
    assert set(defs.services) == {"churn_v1", "next_purchase_v1", "next_purchase_category_v1", "value_v1",
                                 "recommender_v1", "serving_v1", "scores_v1"}
    scores = defs.views["member_scores"]
    assert scores.join_keys == [C.MEMBER_ID] and [f.name for f in scores.features] == list(SCORES_SCHEMA)
    assert [p.name for p in defs.services["scores_v1"].feature_view_projections] == ["member_scores"]
    assert [p.name for p in defs.services["recommender_v1"].feature_view_projections] == [
        MEMBER_VIEW, MEMBER_CATEGORY_VIEW, ITEM_VIEW]


@pytest.mark.slow
def test_apply_is_idempotent(fresh: Settings) -> None:
    from features.store import apply, feature_store

    for view in (MEMBER_VIEW, MEMBER_CATEGORY_VIEW, ITEM_VIEW):
        write_snapshot(fresh, view, "2024-01-01", 8)
    apply(fresh)
    store = feature_store(fresh)
    first = sorted(v.name for v in store.list_feature_views())
    apply(fresh)
    assert sorted(v.name for v in store.list_feature_views()) == first == sorted(
        [ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW, "member_scores"])
    assert sorted(s.name for s in store.list_feature_services()) == [
        "churn_v1", "next_purchase_category_v1", "next_purchase_v1", "recommender_v1", "scores_v1", "serving_v1",
        "value_v1"]
    assert sorted(e.name for e in store.list_entities()) == ["category", "item", "member"]


@pytest.mark.slow
def test_online_tables_are_clustered_and_feast_writes_and_tears_them_down(fresh: Settings) -> None:
    """apply creates each view's online table WITHOUT ROWID (one B-tree on (entity_key, feature_name)) in a
    WAL database with 16 KiB pages, before Feast, whose own upsert, read and teardown work on it."""
    import sqlite3

    from features.contract import F
    from features.store import ONLINE_DB, ONLINE_PAGE_SIZE, apply, feature_store, online_features

    snap = write_snapshot(fresh, MEMBER_VIEW, "2024-01-08", 6, seed=4).to_pandas()
    apply(fresh)
    apply(fresh)  # Feast's CREATE ... IF NOT EXISTS leaves our tables and the placeholder index alone
    db = fresh.dirs.feast / ONLINE_DB
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA page_size").fetchone() == (ONLINE_PAGE_SIZE,)
        schema = dict(conn.execute("SELECT name, sql FROM sqlite_master").fetchall())
    for view in (MEMBER_VIEW, MEMBER_CATEGORY_VIEW, ITEM_VIEW):
        tbl = f"{fresh.feast.project}_{view}"
        assert schema[tbl].endswith("PRIMARY KEY(entity_key, feature_name)) WITHOUT ROWID")
        assert schema[tbl + "_ek"].endswith("(entity_key) WHERE 0")
    store = feature_store(fresh)
    store.write_to_online_store(MEMBER_VIEW, df=snap.head(3))  # Feast's own upsert, twice
    store.write_to_online_store(MEMBER_VIEW, df=snap.head(3))
    out = online_features(fresh, ["M000001", "M000005"])
    assert out[F.TENURE_DAYS].iloc[0] == snap[F.TENURE_DAYS].iloc[1]
    assert pd.isna(out[F.TENURE_DAYS].iloc[1])
    with sqlite3.connect(db) as conn:
        n = conn.execute(f'SELECT count(*) FROM "{fresh.feast.project}_{MEMBER_VIEW}"').fetchone()[0]
    assert n == 3 * len(store.get_feature_view(MEMBER_VIEW).features)
    store.teardown()
    assert not db.exists()


@pytest.mark.slow
def test_training_frame_point_in_time(fresh: Settings) -> None:
    from features.contract import F
    from features.store import apply, training_frame

    dates = ["2024-01-01", "2024-01-08", "2024-01-15"]
    snaps = {d: write_snapshot(fresh, MEMBER_VIEW, d, 30, seed=i).to_pandas() for i, d in enumerate(dates)}
    apply(fresh)
    rows = [
        ("M000001", "2023-12-31 00:00"),  # before any snapshot: kept, with nulls
        ("M000002", "2024-01-01 00:00"),  # exactly on a snapshot: that one (it uses data before it)
        ("M000003", "2024-01-07 23:59"),  # just before the second: the first
        ("M000004", "2024-01-10 12:00"),  # the second
        ("M000004", "2024-01-15 00:00"),  # the same member later: the third
        ("M999999", "2024-01-10 00:00"),  # unknown member: kept, with nulls
        ("M000005", "2024-02-15 00:00"),  # beyond the ttl (9 days) after the last snapshot: nulls
        ("M000002", "2024-01-01 00:00"),  # duplicate entity row: kept twice
    ]
    entity = pd.DataFrame({C.MEMBER_ID: [r[0] for r in rows],
                           C.EVENT_TIMESTAMP: pd.to_datetime([r[1] for r in rows], utc=True),
                           "label": np.arange(len(rows))})
    out = training_frame(fresh, entity, "churn_v1")
    assert len(out) == len(entity)
    assert out["label"].tolist() == list(range(len(rows)))
    assert out[C.MEMBER_ID].tolist() == entity[C.MEMBER_ID].tolist()
    expected_snapshot = [None, "2024-01-01", "2024-01-01", "2024-01-08", "2024-01-15", None, None,
                         "2024-01-01"]
    for i, snap in enumerate(expected_snapshot):
        got = out.iloc[i]
        if snap is None:
            assert pd.isna(got[F.TENURE_DAYS]) and pd.isna(got[F.SPEND_TOTAL]), i
            continue
        src = snaps[snap].set_index(C.MEMBER_ID).loc[got[C.MEMBER_ID]]
        for col in (F.TENURE_DAYS, F.ORDERS_TOTAL, F.SPEND_TOTAL, F.RECENCY_DAYS, F.RFM_SEGMENT, F.CHANNEL):
            want, have = src[col], got[col]
            if pd.isna(want):
                assert pd.isna(have), (i, col)
            elif isinstance(want, float):
                assert have == pytest.approx(want), (i, col)
            else:
                assert have == want, (i, col)


@pytest.mark.slow
def test_training_frame_rejects_bad_entity_frames(fresh: Settings) -> None:
    from features.store import TrainingFrameError, training_frame

    write_snapshot(fresh, MEMBER_VIEW, "2024-01-01", 5)
    naive = pd.DataFrame({C.MEMBER_ID: ["M000001"], C.EVENT_TIMESTAMP: pd.to_datetime(["2024-01-02"])})
    with pytest.raises(ValueError, match="timezone-aware"):
        training_frame(fresh, naive, "churn_v1")
    with pytest.raises(ValueError, match="lacks column"):
        training_frame(fresh, naive.drop(columns=[C.MEMBER_ID]), "churn_v1")
    with pytest.raises(KeyError, match="unknown feature service"):
        training_frame(fresh, naive, "nope_v1")
    assert issubclass(TrainingFrameError, RuntimeError)


@pytest.mark.slow
def test_online_read_of_unknown_member_is_null(fresh: Settings) -> None:
    from features.contract import F
    from features.online import load_online
    from features.store import apply, online_features

    snap = write_snapshot(fresh, MEMBER_VIEW, "2024-01-08", 20, seed=3).to_pandas()
    apply(fresh)
    load_online(fresh, MEMBER_VIEW, method="bulk")
    now = pd.Timestamp("2024-01-09 12:00", tz="UTC")
    out = online_features(fresh, ["M000004", "nobody"], now=now)
    assert out[C.MEMBER_ID].tolist() == ["M000004", "nobody"]
    known, unknown = out.iloc[0], out.iloc[1]
    src = snap.set_index(C.MEMBER_ID).loc["M000004"]
    assert known[F.TENURE_DAYS] == src[F.TENURE_DAYS]
    assert known[C.FEATURE_TS] == pd.Timestamp("2024-01-08", tz="UTC")
    assert known[C.FEATURE_AGE_DAYS] == pytest.approx(1.5)
    assert not known[C.STALE]
    assert pd.isna(unknown[F.TENURE_DAYS]) and pd.isna(unknown[F.SPEND_TOTAL])
    assert unknown[F.RFM_SEGMENT] is None
    assert pd.isna(unknown[C.FEATURE_TS]) and unknown[C.STALE]
    later = online_features(fresh, ["M000004"], now=pd.Timestamp("2024-01-20", tz="UTC"))
    assert later[C.STALE].tolist() == [True]  # older than ttl_days = 2


@pytest.mark.parametrize(("profile", "name"), [("embedded", "feature_store.yaml"),
                                               ("production", "feature_store.production.yaml")])
def test_documented_yaml_matches_the_code(profile: str, name: str) -> None:
    """The feature_store*.yaml files for the feast CLI say what repo_config builds from default settings."""
    import yaml
    from feast import RepoConfig

    from features.settings import PROJECT_ROOT, load_settings
    from features.store import repo_config

    settings = load_settings(environ={}, profile=profile)
    path = PROJECT_ROOT / "features" / name
    documented = RepoConfig(repo_path=path.parent, **yaml.safe_load(path.read_text()))
    built = repo_config(settings)
    assert documented.project == built.project
    assert documented.entity_key_serialization_version == built.entity_key_serialization_version
    assert documented.offline_store.type == built.offline_store.type
    assert documented.online_store.type == built.online_store.type
    assert documented.registry.registry_type == built.registry.registry_type
    if profile == "embedded":
        assert (path.parent / documented.online_store.path).resolve() == Path(built.online_store.path)
        assert (path.parent / documented.registry.path).resolve() == Path(built.registry.path)
    else:
        assert documented.online_store.connection_string == built.online_store.connection_string
        assert documented.registry.path == built.registry.path
