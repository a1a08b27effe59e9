"""The Feast feature store: repo config per profile, apply, training sets and online reads.

``import feast`` costs seconds, so it happens inside the functions here, never when ``features`` is
imported (the CLI stays quick). The config is built from settings; ``features/feature_store.yaml`` and
``features/feature_store.production.yaml`` document the same config for users of the ``feast`` CLI.

=================  ==============================================  =====================================
part               embedded profile                                production profile
=================  ==============================================  =====================================
offline store      DuckDB over the snapshot parquet files          DuckDB (Spark comes later)
online store       SQLite at ``<dirs.feast>/online_store.db``      Redis at ``feast.redis_connection``
registry           file ``<dirs.feast>/registry.db``               SQL registry at ``feast.registry_url``
=================  ==============================================  =====================================

Example::

    apply(settings)
    frame = training_frame(settings, entity_df, "churn_v1")   # one row per entity row, same order
    online_features(settings, ["M1", "M2"])                    # serving_v1, with feature_ts and age
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from features.contract import C
from features.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore, RepoConfig

    from features.definitions import Definitions

log = logging.getLogger(__name__)

ENTITY_KEY_SERIALIZATION_VERSION = 3  # the version Feast 0.67 recommends (older ones are deprecated)
ONLINE_DB = "online_store.db"
REGISTRY_DB = "registry.db"
ONLINE_PAGE_SIZE = 16_384
_ROW = "__repurchase_row"  # private column that carries the entity row order through Feast

_lock = threading.Lock()
_stores: dict[str, FeatureStore] = {}
_definitions: dict[str, Definitions] = {}


class TrainingFrameError(RuntimeError):
    """A training set that does not have exactly one row per entity row."""


def _key(settings: Settings) -> str:
    return settings.model_dump_json()


def repo_config(settings: Settings) -> RepoConfig:
    """The Feast ``RepoConfig`` of ``settings.profile`` (see the module docstring)."""
    from feast import RepoConfig

    feast_dir = settings.dirs.feast
    if settings.profile == "production":
        registry: dict[str, Any] = {"registry_type": "sql", "path": settings.feast.registry_url,
                                    "cache_ttl_seconds": 60,
                                    "sqlalchemy_config_kwargs": {"pool_pre_ping": True}}
        online: dict[str, Any] = {"type": "redis", "connection_string": settings.feast.redis_connection}
    else:
        registry = {"registry_type": "file", "path": str(feast_dir / REGISTRY_DB), "cache_ttl_seconds": 60}
        online = {"type": "sqlite", "path": str(feast_dir / ONLINE_DB)}
    return RepoConfig(
        project=settings.feast.project,
        provider="local",
        registry=registry,
        online_store=online,
        offline_store={"type": "duckdb"},
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
        repo_path=feast_dir,
    )


def feature_store(settings: Settings) -> FeatureStore:
    """The ``FeatureStore`` for ``settings``, built once per distinct settings and cached."""
    key = _key(settings)
    with _lock:
        store = _stores.get(key)
        if store is None:
            from feast import FeatureStore

            settings.dirs.feast.mkdir(parents=True, exist_ok=True)
            store = FeatureStore(config=repo_config(settings))
            _stores[key] = store
        return store


def definitions(settings: Settings) -> Definitions:
    """The project's Feast objects for ``settings`` (imports feast), built once per distinct settings."""
    from features.definitions import build_definitions

    key = _key(settings)
    with _lock:
        defs = _definitions.get(key)
        if defs is None:
            defs = _definitions[key] = build_definitions(settings)
        return defs


ONLINE_COLUMNS = ("entity_key", "feature_name", "value", "value_text", "vector_value", "event_ts", "created_ts")


def quote_sql_id(name: str) -> str:
    """A SQLite identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def create_online_table(conn: sqlite3.Connection, table: str) -> None:
    """Create ``table`` (if missing) with the columns and primary key of Feast 0.67's SQLite online store,
    but clustered: ``WITHOUT ROWID``, so the primary key (entity_key, feature_name) is the table's one
    B-tree. Feast's reads (by entity_key, a prefix of that key) and its upsert (``ON CONFLICT(entity_key,
    feature_name)``) work on it unchanged; the table is about half the size of Feast's rowid table plus
    two indexes, and a bulk load in key order appends to it."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {quote_sql_id(table)} (entity_key BLOB, feature_name TEXT, "
                 "value BLOB, value_text TEXT, vector_value BLOB, event_ts timestamp, created_ts timestamp, "
                 "PRIMARY KEY(entity_key, feature_name)) WITHOUT ROWID")


def create_online_index(conn: sqlite3.Connection, table: str) -> None:
    """Create the index Feast's ``update`` looks for (``<table>_ek``) as an empty partial index.

    Feast runs ``CREATE INDEX IF NOT EXISTS <table>_ek ON <table> (entity_key)`` on every apply; on the
    clustered table that index would only repeat the primary key's prefix and double the cost of every
    write. ``WHERE 0`` keeps it empty: the name is taken, nothing is stored, no query can use it."""
    conn.execute(f"CREATE INDEX IF NOT EXISTS {quote_sql_id(table + '_ek')} ON {quote_sql_id(table)} "
                 "(entity_key) WHERE 0")


def _init_online_db(path: Path, tables: Sequence[str] = ()) -> None:
    """Create the SQLite online store (16 KiB pages, WAL) and the views' tables Feast has not created yet.

    16 KiB pages measured ~30% faster bulk loads than SQLite's default 4 KiB. WAL lets readers go on
    reading during a load. Tables are created clustered (see :func:`create_online_table`) before Feast's
    ``apply``, whose ``CREATE TABLE IF NOT EXISTS`` then leaves them alone; tables that exist (Feast's own
    layout in an older database) are left as they are: the next bulk load rebuilds them clustered.
    """
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if new:
            conn.execute(f"PRAGMA page_size={ONLINE_PAGE_SIZE}")
            conn.execute("VACUUM")
            conn.execute("PRAGMA journal_mode=WAL")
        for table in tables:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,))
            if exists.fetchone() is None:
                conn.execute("BEGIN IMMEDIATE")
                create_online_table(conn, table)
                create_online_index(conn, table)
                conn.execute("COMMIT")
    finally:
        conn.close()


def apply(settings: Settings) -> Definitions:
    """Register the entities, sources, views and services, and create the online tables. Idempotent."""
    defs = definitions(settings)
    store = feature_store(settings)
    if settings.profile == "embedded":
        from feast.infra.online_stores.helpers import compute_table_id

        versioning = store.config.registry.enable_online_feature_view_versioning
        tables = [compute_table_id(settings.feast.project, fv, versioning)
                  for fv in defs.views.values() if fv.online]
        _init_online_db(settings.dirs.feast / ONLINE_DB, tables)
    store.apply(defs.objects())
    log.info("applied %d Feast objects to project %s", len(defs.objects()), settings.feast.project)
    return defs


def service_join_keys(settings: Settings, service: str) -> tuple[str, ...]:
    """The entity columns an entity frame needs for ``service``."""
    from features.definitions import VIEW_KEYS

    defs = definitions(settings)
    if service not in defs.services:
        raise KeyError(f"unknown feature service {service!r}; the services are {', '.join(defs.services)}")
    keys: dict[str, None] = {}
    for projection in defs.services[service].feature_view_projections:
        for k in VIEW_KEYS[projection.name]:
            keys[k] = None
    return tuple(keys)


def _check_entity_df(entity_df: pd.DataFrame, keys: Sequence[str], service: str) -> pd.DataFrame:
    missing = [c for c in (*keys, C.EVENT_TIMESTAMP) if c not in entity_df.columns]
    if missing:
        raise ValueError(f"entity frame for {service} lacks column(s) {', '.join(missing)}; it has "
                         f"{', '.join(map(str, entity_df.columns))}")
    df = entity_df.copy()
    ts = df[C.EVENT_TIMESTAMP]
    if not pd.api.types.is_datetime64_any_dtype(ts):
        raise ValueError(f"entity frame column {C.EVENT_TIMESTAMP} must hold timestamps, not {ts.dtype}")
    if getattr(ts.dt, "tz", None) is None:
        raise ValueError(f"entity frame column {C.EVENT_TIMESTAMP} must be timezone-aware (UTC)")
    bad = ts.isna().to_numpy()
    for k in keys:
        bad_k = df[k].isna().to_numpy()
        if bad_k.any():
            raise ValueError(f"entity frame column {k} is null in row {int(np.flatnonzero(bad_k)[0])}")
    if bad.any():
        raise ValueError(f"entity frame column {C.EVENT_TIMESTAMP} is null in row "
                         f"{int(np.flatnonzero(bad)[0])}")
    # microseconds: DuckDB 2.0 fails on TIMESTAMPTZ_NS casts (PITFALLS)
    df[C.EVENT_TIMESTAMP] = ts.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    for k in keys:
        df[k] = df[k].astype(str)
    return df


def training_frame(settings: Settings, entity_df: pd.DataFrame, service: str) -> pd.DataFrame:
    """Point-in-time features of ``service`` for every row of ``entity_df``, in the same order.

    ``entity_df`` holds the service's join keys (``member_id``, plus ``category``/``item_id`` for
    ``recommender_v1``) and ``event_timestamp`` (UTC); other columns (labels) are carried through. Each
    row gets the latest snapshot with ``as_of <= event_timestamp`` within the views' ttl, or nulls when
    there is none. Raises :class:`TrainingFrameError` unless the result has exactly one row per entity
    row (the file offline store silently drops rows; DuckDB keeps them).
    """
    keys = service_join_keys(settings, service)
    if _ROW in entity_df.columns:
        raise ValueError(f"entity frame must not have a column named {_ROW}")
    df = _check_entity_df(entity_df, keys, service)
    df[_ROW] = np.arange(len(df), dtype=np.int64)
    store = feature_store(settings)
    job = store.get_historical_features(entity_df=df, features=store.get_feature_service(service))
    out = job.to_df()
    if len(out) != len(df) or out[_ROW].nunique() != len(df):
        raise TrainingFrameError(
            f"training frame for {service} has {len(out)} rows ({out[_ROW].nunique()} distinct entity rows) "
            f"for {len(df)} entity rows: the offline store dropped or duplicated rows"
        )
    out = out.sort_values(_ROW).drop(columns=_ROW).reset_index(drop=True)
    out[C.EVENT_TIMESTAMP] = pd.to_datetime(out[C.EVENT_TIMESTAMP], utc=True)
    front = [*keys, C.EVENT_TIMESTAMP]
    return out[front + [c for c in out.columns if c not in front]]


_services: dict[tuple[int, str], tuple[Any, Any]] = {}


def _online_service(store: FeatureStore, service: str) -> Any:
    """The ``FeatureService`` object, kept until the registry cache refreshes. Asking the registry per read
    costs ~10 ms (proto decoding under typeguard) and, without ``allow_cache``, re-reads the registry,
    which also clears Feast's request-context cache: 20 ms per one-member read instead of ~1 ms."""
    created = store.registry.cached_registry_proto_created
    key = (id(store), service)
    with _lock:
        hit = _services.get(key)
        if hit is None or hit[0] != created or created is None:
            hit = _services[key] = (created, store.get_feature_service(service, allow_cache=True))
        return hit[1]


def _online_raw(settings: Settings, member_ids: Sequence[str], service: str,
                caller: str) -> tuple[list[str], dict[str, list[Any]], np.ndarray]:
    """(ids, Feast's answer without the timestamps, the newest event second of each row; 0 = not found)."""
    keys = service_join_keys(settings, service)
    if keys != (C.MEMBER_ID,):
        raise ValueError(f"{caller} reads member-keyed services; {service} needs {', '.join(keys)}")
    ids = [str(m) for m in member_ids]
    if not ids:
        raise ValueError(f"{caller} needs at least one member id")
    store = feature_store(settings)
    response = store.get_online_features(features=_online_service(store, service),
                                         entity_rows=[{C.MEMBER_ID: m} for m in ids])
    raw = response.to_dict(include_event_timestamps=True)
    from feast.online_response import TIMESTAMP_POSTFIX

    ts_cols = [c for c in raw if c.endswith(TIMESTAMP_POSTFIX)]
    seconds = np.zeros(len(ids), dtype=np.int64)
    for c in ts_cols:
        seconds = np.maximum(seconds, np.asarray(raw[c], dtype=np.int64))
    return ids, {c: v for c, v in raw.items() if c not in ts_cols and c != C.MEMBER_ID}, seconds


def online_features(settings: Settings, member_ids: Sequence[str], service: str = "serving_v1",
                    now: pd.Timestamp | None = None) -> pd.DataFrame:
    """Latest online values of ``service`` for ``member_ids`` (one row each, in order).

    Besides the features, each row has ``feature_ts`` (the as_of of the values; NaT when the member is
    not in the online store), ``feature_age_days`` (days from feature_ts to ``now``) and ``stale`` (not
    found, or older than ``settings.features.ttl_days``: Feast does not apply ttl online).
    An unknown member is not an error: its features come back null (NaN for numbers, None for strings)
    with ``feature_ts`` NaT and ``stale`` True; the caller decides on the fallback answer.
    """
    ids, raw, seconds = _online_raw(settings, member_ids, service, "online_features")
    frame = pd.DataFrame(raw)
    frame.insert(0, C.MEMBER_ID, ids)
    feature_ts = pd.to_datetime(pd.Series(seconds, index=frame.index, dtype="float64").where(seconds > 0),
                                unit="s", utc=True)
    now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    frame[C.FEATURE_TS] = feature_ts
    frame[C.FEATURE_AGE_DAYS] = (now - feature_ts).dt.total_seconds() / 86400.0
    frame[C.STALE] = ~(frame[C.FEATURE_AGE_DAYS] <= settings.features.ttl_days)
    return frame


def _values(values: list[Any]) -> np.ndarray:
    """Numbers (and flags) as float64 with NaN for missing; anything holding text as objects (None kept)."""
    first = next((v for v in values if v is not None), None)
    if isinstance(first, str | bytes):
        return np.asarray(values, dtype=object)
    return np.asarray(values, dtype=np.float64)


def online_columns(settings: Settings, member_ids: Sequence[str], service: str = "serving_v1",
                   now: pd.Timestamp | None = None) -> dict[str, np.ndarray]:
    """What :func:`online_features` answers, as one numpy array per column instead of a pandas frame: the
    API's path (a frame costs more than the whole one-member answer). Numbers are float64 (NaN missing),
    text is object (None missing), ``feature_ts`` datetime64[s] (NaT not found)."""
    ids, raw, seconds = _online_raw(settings, member_ids, service, "online_columns")
    out = {C.MEMBER_ID: np.asarray(ids, dtype=object)}
    out |= {c: _values(v) for c, v in raw.items()}
    now_s = (pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)).timestamp()
    found = seconds > 0
    age = np.where(found, (now_s - seconds) / 86400.0, np.nan)
    ts = seconds.astype("datetime64[s]")
    ts[~found] = np.datetime64("NaT")
    out[C.FEATURE_TS] = ts
    out[C.FEATURE_AGE_DAYS] = age
    out[C.STALE] = ~(age <= settings.features.ttl_days)
    return out
