"""Bulk online load: Feast's exact layout, read back by Feast's own get_online_features."""

from __future__ import annotations

import sqlite3
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from features.contract import C
from features.lake import ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW
from features.settings import Settings
from tests.conftest import make_settings, server_up
from tests.features.test_store import write_snapshot


def _settings(tmp_path: Path, name: str, **over) -> Settings:
    return make_settings(tmp_path / name, feast={"project": f"t_{uuid.uuid4().hex[:10]}"}, **over)


def _read_all(settings: Settings, view: str, entity_rows: list[dict]) -> pd.DataFrame:
    from features.store import feature_store

    store = feature_store(settings)
    fv = store.get_feature_view(view)
    refs = [f"{view}:{f.name}" for f in fv.features]
    response = store.get_online_features(features=refs, entity_rows=entity_rows)
    return response.to_df(include_event_timestamps=True)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        x, y = a[col].tolist(), b[col].tolist()
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            if isinstance(u, float) and np.isnan(u):
                assert isinstance(v, float) and np.isnan(v), (col, i, u, v)
            else:
                assert u == v and type(u) is type(v), (col, i, u, v)


def _table_rows(settings: Settings, view: str) -> list[tuple]:
    from features.store import feature_store

    store = feature_store(settings)
    db = store.config.online_store.path
    with sqlite3.connect(db) as conn:
        return conn.execute(f'SELECT entity_key, feature_name, value, value_text, vector_value, event_ts, '
                            f'created_ts FROM "{settings.feast.project}_{view}" ORDER BY 1, 2').fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("view", [MEMBER_VIEW, MEMBER_CATEGORY_VIEW, ITEM_VIEW])
def test_bulk_equals_feast_materialize_sqlite(tmp_path: Path, view: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from features import online
    from features.online import load_online
    from features.store import apply

    monkeypatch.setattr(online, "CHUNK_ROWS", 70)  # several chunks, each with its own slot widths

    a, b = _settings(tmp_path, "feast"), _settings(tmp_path, "bulk")
    n = 300
    for s in (a, b):
        write_snapshot(s, view, "2024-03-04", n, seed=11)
        apply(s)
    ra = load_online(a, view, method="feast")
    rb = load_online(b, view, method="bulk")
    assert (ra.rows, rb.rows) == (n, n)
    assert (ra.method, rb.method) == ("feast", "bulk")

    # byte for byte the same table rows, value_text and event_ts included
    rows_a, rows_b = _table_rows(a, view), _table_rows(b, view)
    assert len(rows_a) == len(rows_b) > n
    assert rows_a == rows_b

    snap = write_snapshot(a, view, "2024-03-04", n, seed=11)  # same data again, to know the keys
    keys = {MEMBER_VIEW: [C.MEMBER_ID], MEMBER_CATEGORY_VIEW: [C.MEMBER_ID, C.CATEGORY],
            ITEM_VIEW: [C.ITEM_ID]}[view]
    entity_rows = [{k: snap.column(k)[i].as_py() for k in keys} for i in range(0, n, 3)]
    entity_rows.append({k: "unknown" for k in keys})
    got_a, got_b = _read_all(a, view, entity_rows), _read_all(b, view, entity_rows)
    _assert_same(got_a, got_b)
    # and the values are the snapshot's
    first = snap.slice(0, 1).to_pylist()[0]
    for name, value in first.items():
        if name in keys or name == C.AS_OF:
            continue
        have = got_b[name].iloc[0]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            assert have is None or (isinstance(have, float) and np.isnan(have)), name
        else:
            assert have == value, name


@pytest.mark.slow
def test_bulk_upserts_over_an_earlier_load(tmp_path: Path) -> None:
    from features.contract import F
    from features.online import load_online
    from features.store import apply, online_features

    s = _settings(tmp_path, "re")
    write_snapshot(s, MEMBER_VIEW, "2024-03-04", 50, seed=1)
    apply(s)
    load_online(s, MEMBER_VIEW, method="bulk")
    newer = write_snapshot(s, MEMBER_VIEW, "2024-03-11", 40, seed=2).to_pandas().set_index(C.MEMBER_ID)
    report = load_online(s, MEMBER_VIEW)  # latest snapshot by default
    assert report.as_of == "2024-03-11" and report.rows == 40
    out = online_features(s, ["M000003", "M000045"], now=pd.Timestamp("2024-03-12", tz="UTC"))
    assert out[F.TENURE_DAYS].iloc[0] == newer.loc["M000003", F.TENURE_DAYS]
    assert out[C.FEATURE_TS].tolist() == [pd.Timestamp("2024-03-11", tz="UTC"),
                                          pd.Timestamp("2024-03-04", tz="UTC")]


@pytest.mark.slow
def test_reload_swaps_tables_readers_see_old_or_new_never_wait(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload builds a new table and swaps it in at commit: a reader polling during the load always
    sees one whole snapshot (old or new), is never blocked beyond a short bound, and a reader holding a
    read transaction across the reload keeps its snapshot; entities the new snapshot lacks keep theirs."""
    import threading
    import time

    from features import online
    from features.online import load_online
    from features.store import apply, feature_store

    monkeypatch.setattr(online, "CHUNK_ROWS", 100)  # many chunks: a long write transaction
    s = _settings(tmp_path, "swap")
    n = 1_500
    write_snapshot(s, MEMBER_VIEW, "2024-03-04", n, seed=1)
    apply(s)
    load_online(s, MEMBER_VIEW)
    write_snapshot(s, MEMBER_VIEW, "2024-03-11", n - 100, seed=2)  # the last 100 members drop out
    db = feature_store(s).config.online_store.path
    tbl = f'"{s.feast.project}_{MEMBER_VIEW}"'
    old_ts, new_ts = (int(pd.Timestamp(d, tz="UTC").timestamp()) for d in ("2024-03-04", "2024-03-11"))

    held = sqlite3.connect(db, timeout=0.2)
    held.execute("BEGIN")
    before = held.execute(f"SELECT event_ts, count(*) FROM {tbl} GROUP BY 1").fetchall()
    assert before == [(old_ts, n * 33)]

    seen: list[tuple] = []
    waits: list[float] = []
    done = threading.Event()

    def poll() -> None:
        reader = sqlite3.connect(db, timeout=0.2)
        try:
            while not done.is_set():
                t0 = time.perf_counter()
                seen.append(tuple(reader.execute(f"SELECT event_ts, count(*) FROM {tbl} GROUP BY 1 ORDER BY 1")
                                  .fetchall()))
                waits.append(time.perf_counter() - t0)
        finally:
            reader.close()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        report = load_online(s, MEMBER_VIEW)
    finally:
        done.set()
        poller.join()
    assert report.rows == n - 100
    # the held read transaction still sees the whole old snapshot, then the new one after it ends
    assert held.execute(f"SELECT event_ts, count(*) FROM {tbl} GROUP BY 1").fetchall() == before
    held.execute("COMMIT")
    after = ((old_ts, 100 * 33), (new_ts, (n - 100) * 33))
    assert tuple(held.execute(f"SELECT event_ts, count(*) FROM {tbl} GROUP BY 1 ORDER BY 1").fetchall()) == after
    held.close()
    assert len(seen) > 5 and set(seen) <= {tuple(before), after}, set(seen)
    assert max(waits) < 1.0
    with sqlite3.connect(db) as conn:  # the rebuilt table replaced the old one; no leftovers
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert not any(name.endswith("__bulk_new") for name in names)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.slow
def test_bulk_rebuilds_a_table_in_feasts_own_layout(tmp_path: Path) -> None:
    """An online table Feast created (rowid table + two indexes, an older database) is rebuilt clustered
    by the next bulk load, with every row Feast had written kept unless overwritten."""
    from features.online import load_online
    from features.store import ONLINE_DB, apply, feature_store

    a, b = _settings(tmp_path, "feast"), _settings(tmp_path, "legacy")
    for s in (a, b):
        write_snapshot(s, MEMBER_VIEW, "2024-03-04", 30, seed=3)
    apply(a)
    db = b.dirs.feast / ONLINE_DB
    db.parent.mkdir(parents=True)
    tbl = f"{b.feast.project}_{MEMBER_VIEW}"
    with sqlite3.connect(db) as conn:  # Feast 0.67's own statements (SqliteOnlineStore.update)
        conn.execute(f'CREATE TABLE "{tbl}" (entity_key BLOB, feature_name TEXT, value BLOB, value_text TEXT, '
                     "vector_value BLOB, event_ts timestamp, created_ts timestamp, "
                     "PRIMARY KEY(entity_key, feature_name))")
        conn.execute(f'CREATE INDEX "{tbl}_ek" ON "{tbl}" (entity_key)')
    apply(b)
    for s in (a, b):
        load_online(s, MEMBER_VIEW, method="feast")
        write_snapshot(s, MEMBER_VIEW, "2024-03-11", 20, seed=4)
    load_online(a, MEMBER_VIEW, method="feast")
    assert load_online(b, MEMBER_VIEW, method="bulk").method == "bulk"
    assert _table_rows(a, MEMBER_VIEW) == _table_rows(b, MEMBER_VIEW)
    with sqlite3.connect(feature_store(b).config.online_store.path) as conn:
        sql = dict(conn.execute("SELECT name, sql FROM sqlite_master").fetchall())
    assert sql[tbl].endswith("WITHOUT ROWID") and sql[tbl + "_ek"].endswith("WHERE 0")
    rows = [{C.MEMBER_ID: f"M{i:06d}"} for i in range(0, 30, 4)]
    _assert_same(_read_all(a, MEMBER_VIEW, rows), _read_all(b, MEMBER_VIEW, rows))


def test_float_text_is_pythons_repr() -> None:
    from features.online import _float_text

    values = [0.0, -0.0, 3.0, -1.5, 0.1, 1 / 3, 1e-4, 9.99e-5, 1e-5, 2.5e-7, 123.4567, 1e12, 9999999999999.5,
              1e13, 1e15, 1e16, 123456789012.3456, 24787734713.11793, 5e-324, 1.7976931348623157e308,
              float("inf"), float("-inf"), float("nan"), None]
    got = _float_text(pa.array(values, pa.float64())).to_pylist()
    assert got == [None if v is None or v != v else repr(v) for v in values]
    rng = np.random.default_rng(0)
    many = np.concatenate([rng.gamma(2.0, 30.0, 20_000).round(4),
                           rng.standard_normal(20_000) * 10.0 ** rng.integers(-8, 18, 20_000)])
    assert _float_text(pa.array(many)).to_pylist() == [repr(v) for v in many.tolist()]


def test_encoders_match_feast_serializers() -> None:
    from features.online import check_layout

    table = pa.table({
        C.MEMBER_ID: pa.array(["a", "ünï", "x" * 300, ""]),
        "f": pa.array([1.5, float("nan"), None, -0.0]),
        "i": pa.array([0, -1, 2**62, None], pa.int64()),
        "s": pa.array(["", None, "é" * 100, "z" * 5000]),
        "b": pa.array([True, False, None, True]),
    })
    check_layout(table, (C.MEMBER_ID,), {"f": "float", "i": "int", "s": "string", "b": "bool"})


def test_too_long_string_is_left_to_feast() -> None:
    from features.online import BulkLayoutError, check_layout

    table = pa.table({C.MEMBER_ID: pa.array(["a"]), "s": pa.array(["y" * 20_000])})
    with pytest.raises(BulkLayoutError, match="column s holds a string of 20000 bytes"):
        check_layout(table, (C.MEMBER_ID,), {"s": "string"})


def test_resp_headers_and_rows() -> None:
    from features.online import _bytes_column, _constant, _resp_length, _rows_to_bytes

    lens = np.array([0, 9, 10, 99, 100, 12345])
    got = _rows_to_bytes([_resp_length(lens)])
    assert got == [b"$0\r\n", b"$9\r\n", b"$10\r\n", b"$99\r\n", b"$100\r\n", b"$12345\r\n"]
    col = _bytes_column([b"ab", b"", b"\x00\x01\x02"])
    rows = _rows_to_bytes([_resp_length(col.lens), col, _constant(b"\r\n", 3)], prefix=b"*")
    assert rows == [b"*$2\r\nab\r\n", b"*$0\r\n\r\n", b"*$3\r\n\x00\x01\x02\r\n"]


@pytest.mark.slow
def test_layout_mismatch_falls_back_to_feast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from features import online
    from features.store import apply, online_features

    s = _settings(tmp_path, "fb")
    snap = write_snapshot(s, MEMBER_VIEW, "2024-03-04", 10, seed=5).to_pandas().set_index(C.MEMBER_ID)
    apply(s)
    monkeypatch.setattr(online, "LAYOUT_FEAST_VERSION", "0.0.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = online.load_online(s, MEMBER_VIEW, method="bulk")
    assert report.method == "feast-write"
    assert any("falls back" in str(w.message) for w in caught)
    out = online_features(s, ["M000002"])
    assert out["tenure_days"].iloc[0] == snap.loc["M000002", "tenure_days"]


def test_bad_snapshot_is_named(tmp_path: Path) -> None:
    from features.lake import atomic_path, snapshot_path
    from features.online import read_snapshot

    s = _settings(tmp_path, "bad")
    table = write_snapshot(s, ITEM_VIEW, "2024-03-04", 5).drop_columns(["item_price"])
    target = snapshot_path(s, ITEM_VIEW, "2024-03-04")
    with atomic_path(target) as tmp:
        pa.parquet.write_table(table, tmp)
    with pytest.raises(ValueError, match=r"part-0.parquet: missing column\(s\) item_price"):
        read_snapshot(s, ITEM_VIEW, "2024-03-04")
    retyped = table.append_column("item_price", pa.array(["1.5"] * 5))
    with atomic_path(target) as tmp:
        pa.parquet.write_table(retyped, tmp)
    with pytest.raises(ValueError, match="column item_price is string, the contract says float"):
        read_snapshot(s, ITEM_VIEW, "2024-03-04")


def _production(tmp_path: Path, name: str) -> Settings:
    if not server_up(6379):
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    if not server_up(5432):
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    return _settings(tmp_path, name, profile="production")


def _cleanup(settings: Settings) -> None:
    """Delete the test project's Redis keys and its registry rows."""
    from features.store import feature_store

    store = feature_store(settings)
    client = store._get_provider().online_store._get_client(store.config.online_store)
    keys = list(client.scan_iter(match=b"*" + settings.feast.project.encode()))
    if keys:
        client.delete(*keys)
    store.registry.delete_project(settings.feast.project, commit=True)


@pytest.mark.integration
@pytest.mark.slow
def test_bulk_equals_feast_materialize_redis(tmp_path: Path) -> None:
    """Production profile: both methods into real Redis, compared through get_online_features."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from features.online import load_online
    from features.store import apply, feature_store

    a, b = _production(tmp_path, "ra"), _production(tmp_path, "rb")
    n = 200
    try:
        for s in (a, b):
            write_snapshot(s, MEMBER_VIEW, "2024-03-04", n, seed=21)
            apply(s)
        load_online(a, MEMBER_VIEW, method="feast")
        report = load_online(b, MEMBER_VIEW, method="bulk")
        assert report.method == "bulk"
        rows = [{C.MEMBER_ID: f"M{i:06d}"} for i in range(0, n, 2)] + [{C.MEMBER_ID: "unknown"}]
        _assert_same(_read_all(a, MEMBER_VIEW, rows), _read_all(b, MEMBER_VIEW, rows))
        # the very same hash, field for field and byte for byte
        store_a = feature_store(a)
        client = store_a._get_provider().online_store._get_client(store_a.config.online_store)
        for member in ("M000000", "M000123"):
            key = EntityKey(join_keys=[C.MEMBER_ID], entity_values=[Value(string_val=member)])
            ek = serialize_entity_key(key, entity_key_serialization_version=3)
            hash_a = client.hgetall(ek + a.feast.project.encode())
            assert len(hash_a) == 1 + len(feature_store(a).get_feature_view(MEMBER_VIEW).features)
            assert hash_a == client.hgetall(ek + b.feast.project.encode())
        # the same instant again is skipped by Feast's dedup rule; a newer snapshot overwrites
        load_online(b, MEMBER_VIEW, method="bulk")
        _assert_same(_read_all(a, MEMBER_VIEW, rows), _read_all(b, MEMBER_VIEW, rows))
        for s in (a, b):
            write_snapshot(s, MEMBER_VIEW, "2024-03-11", n, seed=22)
        load_online(a, MEMBER_VIEW, method="feast")
        load_online(b, MEMBER_VIEW, method="bulk")
        got = _read_all(b, MEMBER_VIEW, rows)
        _assert_same(_read_all(a, MEMBER_VIEW, rows), got)
        assert got["tenure_days__ts"].iloc[0] == int(pd.Timestamp("2024-03-11", tz="UTC").timestamp())
    finally:
        for s in (a, b):
            _cleanup(s)


@pytest.mark.integration
@pytest.mark.slow
def test_sql_registry_on_postgres(tmp_path: Path) -> None:
    """Production profile: the SQL registry on PostgreSQL takes apply twice and lists everything."""
    from features.store import apply, feature_store, repo_config

    s = _production(tmp_path, "pg")
    assert repo_config(s).registry.registry_type == "sql"
    write_snapshot(s, MEMBER_VIEW, "2024-03-04", 5)
    try:
        apply(s)
        apply(s)
        store = feature_store(s)
        store.refresh_registry()
        views = sorted(v.name for v in store.list_feature_views())
        assert views == [ITEM_VIEW, MEMBER_CATEGORY_VIEW, MEMBER_VIEW, "member_scores"]
        assert sorted(f.name for f in store.list_feature_services()) == [
            "churn_v1", "next_purchase_category_v1", "next_purchase_v1", "recommender_v1", "scores_v1",
            "serving_v1", "value_v1"]
    finally:
        _cleanup(s)
