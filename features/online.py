"""Loading a feature snapshot into the online store: Feast's materialize, or a bulk writer.

``load_online(settings, view, method="feast")`` is the reference: ``FeatureStore.materialize`` over the
snapshot's instant. It builds one protobuf object per value and writes one SQL statement per value (SQLite)
or one Python HSET per entity (Redis), which is slow for a million members.

``method="bulk"`` (the default) writes the very same bytes, built for whole columns at once with numpy:

- entity key: Feast's ``serialize_entity_key`` version 3 (``<I`` count, per sorted join key ``<I`` type,
  ``<I`` length, name; per value ``<I`` type, ``<I`` length, UTF-8 bytes);
- value: the serialized ``feast.types.Value`` message, i.e. one tag byte and the payload (``0x29`` + 8 bytes
  little-endian for Float64, ``0x20`` + varint for Int64, ``0x12`` + varint length + UTF-8 for String,
  ``0x38`` + 0/1 for Bool); null and NaN give an empty message (``b""``), as Feast writes them;
- SQLite (``<project>_<view>`` table, one row per entity and feature): ``value_text`` as Feast's
  ``extract_text_and_num`` gives it, ``event_ts`` as Feast's sqlite adapter stores it (epoch seconds of the
  naive UTC time), ``created_ts`` null. Rows are staged one per entity (the key and one blob of fixed-width
  slots) and cut into one row per feature by one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (Feast's
  upsert) inside SQLite, in key order, so Python never touches a per-feature row. ``features.store``
  creates the table clustered on that key (``WITHOUT ROWID``), so the rows append to one B-tree; a table
  that already holds rows is rebuilt beside the old one and swapped in at commit (see ``_write_sqlite``),
  and the database is in WAL mode, so readers are never blocked by a load;
- Redis: one hash per entity at ``serialize_entity_key(...) + project``, field ``mmh3("<view>:<feature>")``
  per feature and ``_ts:<view>`` holding a ``google.protobuf.Timestamp``; pipelined HSET, skipping
  entities whose stored timestamp is not older (Feast's dedup rule).

The layout is that of Feast 0.67.0. Before writing, the bulk writer checks the installed Feast version and
compares its bytes for a sample of rows (nulls included) with Feast's own serializers; on any difference it
warns and falls back to Feast's ``write_to_online_store``.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.contract import C, DType
from features.lake import FEATURE_VIEWS, snapshot_dates, snapshot_dir, snapshot_path
from features.settings import Settings

log = logging.getLogger(__name__)

LAYOUT_FEAST_VERSION = "0.67.0"
CHUNK_ROWS = 50_000
_SAMPLE_ROWS = 256
_STRING_TYPE = 2  # feast.types.ValueType.STRING
_MAX_STRING_BYTES = 16_383  # two-byte varint length; longer strings go through Feast
_NEW_SUFFIX = "__bulk_new"  # the table a reload builds before it replaces the view's table
_BUSY_TIMEOUT_S = 60.0
_CHECKPOINT_WAIT_MS = 200
_NULL_TEXT = b"\xff"  # stands for a NULL value_text in the staging blob: never valid UTF-8
_FIXED_LOW, _FIXED_HIGH = 1e-4, 1e13  # magnitudes where Arrow and Python both write floats in fixed notation


_TYPE_CHECKS = {
    "int": pa.types.is_integer, "float": pa.types.is_floating, "bool": pa.types.is_boolean,
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
}


class BulkLayoutError(RuntimeError):
    """The bulk writer's bytes differ from Feast's own: use Feast's writer instead."""


@dataclass(frozen=True)
class LoadReport:
    """What one load did: the snapshot's entity rows, wall seconds, the method actually used (``bulk``,
    ``feast``, or ``feast-write`` after a fallback) and the snapshot's as-of date. On Redis, entities that
    already hold values as new or newer are left alone (Feast's rule) but still counted."""

    view: str
    rows: int
    seconds: float
    method: str
    as_of: str

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.inf


# --- snapshot -------------------------------------------------------------------------------------------


def latest_as_of(settings: Settings, view: str) -> str:
    """The most recent as-of date (YYYY-MM-DD) with a snapshot of ``view``."""
    dates = snapshot_dates(settings, view)
    if not dates:
        raise FileNotFoundError(f"no snapshot of {view} under {snapshot_dir(settings, view)}")
    return dates[-1].isoformat()


def read_snapshot(settings: Settings, view: str, as_of: str) -> pa.Table:
    """One snapshot, checked against the contract (columns, types, one as_of, no null keys)."""
    from features.definitions import VIEW_KEYS, view_schema

    path = snapshot_path(settings, view, as_of)
    if not path.exists():
        raise FileNotFoundError(f"snapshot {path} does not exist")
    table = pq.read_table(path)
    keys = VIEW_KEYS[view]
    expected = [*keys, C.AS_OF, *view_schema(settings, view)]
    missing = [c for c in expected if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for name, dtype in view_schema(settings, view).items():
        if not _TYPE_CHECKS[dtype](table.column(name).type):
            raise ValueError(f"{path}: column {name} is {table.column(name).type}, the contract says {dtype}")
    for k in keys:
        nulls = table.column(k).is_null()
        if pc.any(nulls).as_py():
            row = int(np.flatnonzero(nulls.to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{path}: row {row}, column {k}: null join key")
    ts = table.column(C.AS_OF)
    if not pa.types.is_timestamp(ts.type):
        raise ValueError(f"{path}: column {C.AS_OF} is {ts.type}, not a timestamp")
    distinct = pc.unique(ts.cast(pa.timestamp("us", tz="UTC")))
    if len(distinct) != 1:
        raise ValueError(f"{path}: column {C.AS_OF} holds {len(distinct)} distinct values, expected one")
    return table.select(expected)


def _as_of_datetime(table: pa.Table) -> datetime:
    value = table.column(C.AS_OF).cast(pa.timestamp("us", tz="UTC"))[0].as_py()
    return value.astimezone(UTC)


# --- vectorised encoding ----------------------------------------------------------------------------------


@dataclass
class _Encoded:
    """Encoded values of one column: ``data[i, :lens[i]]`` is row i's serialized Value (0 = null)."""

    data: np.ndarray  # uint8 (n, width)
    lens: np.ndarray  # int64 (n,)


def _varint_table(u: np.ndarray, width: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf varints of uint64 ``u``: bytes (n, width) and lengths (n,)."""
    n = len(u)
    nbytes = np.ones(n, dtype=np.int64)
    rest = u >> np.uint64(7)
    while rest.any():
        nbytes += (rest != 0)
        rest = rest >> np.uint64(7)
    out = np.zeros((n, width), dtype=np.uint8)
    for k in range(width):
        chunk = ((u >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        cont = (k < nbytes - 1).astype(np.uint8) << 7
        out[:, k] = np.where(k < nbytes, chunk | cont, 0)
    return out, nbytes


def _encode_float(col: pa.ChunkedArray | pa.Array) -> _Encoded:
    vals = np.asarray(col.to_numpy(zero_copy_only=False), dtype="<f8")
    n = len(vals)
    data = np.empty((n, 9), dtype=np.uint8)
    data[:, 0] = 0x29  # field 5 (double_val), wire type 1
    data[:, 1:] = np.ascontiguousarray(vals).view(np.uint8).reshape(n, 8)
    return _Encoded(data, np.where(np.isnan(vals), 0, 9))


def _encode_int(col: pa.ChunkedArray | pa.Array) -> _Encoded:
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    vals = pc.fill_null(col.cast(pa.int64()), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    var, nbytes = _varint_table(vals.view(np.uint64))
    data = np.empty((len(vals), 11), dtype=np.uint8)
    data[:, 0] = 0x20  # field 4 (int64_val), varint
    data[:, 1:] = var
    return _Encoded(data, np.where(valid, nbytes + 1, 0))


def _encode_bool(col: pa.ChunkedArray | pa.Array) -> _Encoded:
    valid = ~col.is_null().to_numpy(zero_copy_only=False)
    vals = pc.fill_null(col, False).to_numpy(zero_copy_only=False).astype(np.uint8)
    data = np.empty((len(vals), 2), dtype=np.uint8)
    data[:, 0] = 0x38  # field 7 (bool_val), varint
    data[:, 1] = vals
    return _Encoded(data, np.where(valid, 2, 0))


def _utf8(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UTF-8 bytes of a string column: (flat bytes, offsets (n+1), valid mask)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    arr = arr.cast(pa.large_binary())
    valid = ~arr.is_null().to_numpy(zero_copy_only=False)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets, valid


def _place(flat: np.ndarray, offsets: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Rows of variable-length bytes ``flat[offsets[i]:offsets[i+1]]`` placed at column ``starts[i]``."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    out = np.zeros((n, width), dtype=np.uint8)
    total = int(lengths.sum())
    if total:
        row = np.repeat(np.arange(n), lengths)
        within = np.arange(total) - np.repeat(offsets[:-1] - offsets[0], lengths)
        out[row, np.repeat(starts, lengths) + within] = flat[offsets[0]:offsets[0] + total]
    return out


def _encode_string(col: pa.ChunkedArray | pa.Array) -> _Encoded:
    flat, offsets, valid = _utf8(col)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > _MAX_STRING_BYTES:
        raise BulkLayoutError(f"a string of {int(lengths.max())} bytes is longer than the bulk writer "
                              "handles")
    var, nvar = _varint_table(lengths.astype(np.uint64), width=2)
    width = 1 + 2 + (int(lengths.max()) if len(lengths) else 0)
    data = _place(flat, offsets, 1 + nvar, width)
    data[:, 0] = 0x12  # field 2 (string_val), length-delimited
    data[:, 1] = var[:, 0]
    two = nvar == 2
    data[two, 2] = var[two, 1]
    return _Encoded(data, np.where(valid, 1 + nvar + lengths, 0))


_ENCODERS = {"float": _encode_float, "int": _encode_int, "bool": _encode_bool, "string": _encode_string}


def _entity_keys(table: pa.Table, keys: tuple[str, ...]) -> list[bytes]:
    """Feast's ``serialize_entity_key`` (version 3) of every row, for string join keys."""
    order = sorted(keys)
    head = struct.pack("<I", len(order)) + b"".join(
        struct.pack("<II", _STRING_TYPE, len(k.encode())) + k.encode() for k in order)
    parts: list[_Encoded] = []
    for k in order:
        flat, offsets, _ = _utf8(table.column(k).cast(pa.string()))
        lengths = np.diff(offsets)
        width = 8 + (int(lengths.max()) if len(lengths) else 0)
        data = _place(flat, offsets, np.full(len(lengths), 8), width)
        data[:, 0:4] = np.frombuffer(struct.pack("<I", _STRING_TYPE), np.uint8)
        data[:, 4:8] = lengths.astype("<u4").view(np.uint8).reshape(-1, 4)
        parts.append(_Encoded(data, lengths + 8))
    return _rows_to_bytes(parts, prefix=head)


def _rows_flat(parts: list[_Encoded], prefix: bytes = b"") -> tuple[bytes, np.ndarray]:
    """Concatenate the encoded columns of each row (variable lengths), all rows into one buffer.

    Returns the buffer and the row offsets (n + 1). The columns' fixed-width slots are laid side by side
    and the valid bytes picked with one boolean mask: numpy walks it row by row, so the bytes come out
    in row order, and within a row in column order.
    """
    n = len(parts[0].lens)
    if prefix:
        parts = [_constant(prefix, n), *parts]
    big = np.concatenate([p.data for p in parts], axis=1)
    mask = np.concatenate([np.arange(p.data.shape[1])[None, :] < p.lens[:, None] for p in parts], axis=1)
    row_len = np.sum([p.lens for p in parts], axis=0)
    return big[mask].tobytes(), np.concatenate([[0], np.cumsum(row_len)])


def _rows_to_bytes(parts: list[_Encoded], prefix: bytes = b"") -> list[bytes]:
    """One bytes object per row: the row's encoded columns, concatenated."""
    flat, offsets = _rows_flat(parts, prefix)
    bounds = offsets.tolist()
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _value_bytes(enc: _Encoded) -> list[bytes]:
    """One bytes object per row (Feast's ``ValueProto.SerializeToString()``)."""
    w = enc.data.shape[1]
    buf = np.ascontiguousarray(enc.data).tobytes()
    return [buf[i * w:i * w + int(ln)] for i, ln in enumerate(enc.lens)]


# --- self-check against Feast ---------------------------------------------------------------------------


def _sample(n: int, table: pa.Table, schema: dict[str, DType]) -> np.ndarray:
    """Row indices to compare with Feast: the first rows plus rows holding a null in some column."""
    idx = set(range(min(n, _SAMPLE_ROWS)))
    for name in schema:
        nulls = np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))
        idx.update(nulls[:4].tolist())
        if schema[name] == "float":
            nan = np.flatnonzero(np.isnan(np.asarray(table.column(name).to_numpy(zero_copy_only=False),
                                                     dtype=float)))
            idx.update(nan[:4].tolist())
    return np.array(sorted(idx), dtype=np.int64)


def check_layout(table: pa.Table, keys: tuple[str, ...], schema: dict[str, DType]) -> None:
    """Raise :class:`BulkLayoutError` unless the installed Feast is the one the layout was written for and
    Feast's own serializers give the same bytes as the bulk encoders for a sample of ``table``'s rows."""
    import feast
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import extract_text_and_num
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    if feast.__version__ != LAYOUT_FEAST_VERSION:
        raise BulkLayoutError(f"the bulk layout was written for Feast {LAYOUT_FEAST_VERSION}, "
                              f"installed is {feast.__version__}")
    for name, dtype in schema.items():
        longest = pc.max(pc.binary_length(table.column(name))).as_py() if dtype == "string" else None
        if longest is not None and longest > _MAX_STRING_BYTES:
            raise BulkLayoutError(f"column {name} holds a string of {longest} bytes, longer than the bulk "
                                  "writer handles")
    sample = table.take(pa.array(_sample(table.num_rows, table, schema)))
    ours = _entity_keys(sample, keys)
    order = sorted(keys)
    for i in range(sample.num_rows):
        ek = EntityKey(join_keys=order,
                       entity_values=[python_values_to_proto_values([sample.column(k)[i].as_py()],
                                                                    ValueType.STRING)[0] for k in order])
        if serialize_entity_key(ek, entity_key_serialization_version=3) != ours[i]:
            raise BulkLayoutError(f"entity key of row {i} differs from Feast's serialize_entity_key")
    vt = {"float": ValueType.DOUBLE, "int": ValueType.INT64, "string": ValueType.STRING,
          "bool": ValueType.BOOL}
    for name, dtype in schema.items():
        col = sample.column(name)
        feast_vals = python_values_to_proto_values(col.to_numpy(zero_copy_only=False), vt[dtype])
        mine = _value_bytes(_ENCODERS[dtype](col))
        texts = _text(col, dtype).to_pylist()
        for i, (fv, mv, tx) in enumerate(zip(feast_vals, mine, texts, strict=True)):
            if fv.SerializeToString() != mv:
                raise BulkLayoutError(f"value of {name} in sample row {i} differs from Feast's: "
                                      f"{fv.SerializeToString()!r} != {mv!r}")
            if extract_text_and_num(fv, False)[0] != tx:
                raise BulkLayoutError(f"value_text of {name} in sample row {i} differs from Feast's")


# --- writers --------------------------------------------------------------------------------------------


def _sqlite_event_ts(as_of: datetime) -> int:
    # Feast's sqlite3 adapter: int(naive_utc_datetime.timestamp()) (sqlite.py adapt_datetime_epoch)
    return int(as_of.astimezone(UTC).replace(tzinfo=None).timestamp())


def _digits(values: np.ndarray, d: int) -> np.ndarray:
    """Zero-padded decimal digits of non-negative ints (n, k) as ASCII (n, k*d)."""
    n, k = values.shape
    out = np.empty((n, k, d), dtype=np.uint8)
    v = values.astype(np.int64)
    for j in range(d - 1, -1, -1):
        out[:, :, j] = (v % 10) + 48
        v = v // 10
    return out.reshape(n, k * d)


def _float_text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``str(float)`` of every value (Python's shortest repr), null for null and NaN.

    Arrow's cast gives the same shortest round-trip digits; where both write fixed notation it differs
    only by the missing ``.0`` of whole numbers. Values outside that range, and the few inside it that
    Arrow writes with an exponent (many digits), are formatted by Python itself.
    """
    vals = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    nan = np.isnan(vals)
    with np.errstate(invalid="ignore"):
        mag = np.abs(vals)
        fixed = ((mag >= _FIXED_LOW) & (mag < _FIXED_HIGH)) | (vals == 0)
    text = pa.array(vals).cast(pa.string())
    exp = pc.match_substring(text, "e").to_numpy(zero_copy_only=False)
    text = pc.if_else(pc.match_substring(text, "."), text, pc.binary_join_element_wise(text, ".0", ""))
    other = (~fixed | exp) & ~nan
    if other.any():
        text = pc.replace_with_mask(text, pa.array(other),
                                    pa.array([repr(v) for v in vals[other].tolist()], pa.string()))
    return pc.if_else(pa.array(nan), pa.scalar(None, pa.string()), text)


def _text(col: pa.ChunkedArray | pa.Array, dtype: DType) -> pa.Array:
    """Feast's ``value_text`` of every row (``extract_text_and_num``): null where Feast stores NULL."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if dtype == "float":
        return _float_text(arr)
    if dtype == "int":
        return arr.cast(pa.int64()).cast(pa.string())
    if dtype == "bool":
        return pc.if_else(arr, "True", "False")
    return arr.cast(pa.string())


def _text_slot(col: pa.ChunkedArray | pa.Array, dtype: DType) -> _Encoded:
    """value_text as UTF-8 bytes in a fixed-width slot; a null is the one byte 0xFF (never valid UTF-8),
    which the SQL turns back into NULL."""
    text = _text(col, dtype).cast(pa.binary())
    flat, offsets, _ = _utf8(pc.fill_null(text, pa.scalar(_NULL_TEXT, pa.binary())))
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    return _Encoded(_place(flat, offsets, np.zeros(len(lengths), dtype=np.int64), width), lengths)


def _stage_chunk(chunk: pa.Table, ek: list[bytes], names: list[str],
                 schema: dict[str, DType]) -> tuple[list[tuple], list[tuple]]:
    """Rows of the feature table and of the staging table (one per entity) for one chunk.

    Staging row: entity key and one blob holding, side by side in fixed-width slots, every feature's
    serialized value, its value_text (UTF-8), and both lengths as fixed-width decimal digits. A feature row
    holds the slots' offsets, so SQLite cuts each (entity, feature) row out of the blob with ``substr``.
    """
    n = chunk.num_rows
    values = [_ENCODERS[schema[name]](chunk.column(name)) for name in names]
    texts = [_text_slot(chunk.column(name), schema[name]) for name in names]
    slots = [*values, *texts]
    widths = np.array([e.data.shape[1] for e in slots], dtype=np.int64)
    offs = 1 + np.concatenate([[0], np.cumsum(widths)])
    lens = np.stack([e.lens for e in slots], axis=1)
    d = max(1, len(str(int(lens.max())))) if n else 1
    blob = np.ascontiguousarray(np.concatenate([e.data for e in slots] + [_digits(lens, d)], axis=1))
    k = len(names)
    dig = int(offs[-1])
    f_rows = [(name, int(offs[i]), dig + i * d, int(offs[k + i]), dig + (k + i) * d, d)
              for i, name in enumerate(names)]
    buf = blob.tobytes()
    w = blob.shape[1]
    s_rows = list(zip(ek, [buf[i * w:(i + 1) * w] for i in range(n)], strict=True))
    return f_rows, s_rows


def _journal_wal(conn: sqlite3.Connection, db: Path) -> None:
    """Put the online database in WAL mode (persistent), so readers keep reading the last committed data
    during a load instead of waiting for it; warn when another connection prevents the switch."""
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if mode.lower() == "wal":
        return
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.OperationalError as e:
        mode = str(e)
    if mode.lower() != "wal":
        log.warning("online store %s stays in journal mode %s: readers may wait for the load", db, mode)


def _is_clustered(conn: sqlite3.Connection, table: str) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
    return sql is not None and re.search(r"WITHOUT\s+ROWID\s*$", sql[0], re.IGNORECASE) is not None


def _write_sqlite(settings: Settings, fv: Any, table: pa.Table, keys: tuple[str, ...],
                  schema: dict[str, DType], as_of: datetime) -> None:
    """Load ``table`` into the view's online table with Feast's upsert semantics, in one transaction.

    Rows are built in (entity_key, feature_name) order, which is the clustered key of the table
    ``features.store`` creates, so SQLite appends to the B-tree. An empty table is filled in place; a
    table holding rows (or in Feast's own rowid layout) is rebuilt: the new rows go into a new table, the
    old table's rows that the snapshot does not overwrite are copied over (Feast's write is an upsert),
    and the new table replaces the old one by ``DROP`` + ``ALTER TABLE RENAME`` in the same transaction.
    The database is in WAL mode: readers see the old rows until the commit and the new ones after it,
    and are never blocked by the load.
    """
    from feast.infra.online_stores.helpers import compute_table_id

    from features.store import ONLINE_COLUMNS, create_online_index, create_online_table, quote_sql_id, repo_config

    config = repo_config(settings)
    db = Path(config.online_store.path)
    tbl = compute_table_id(config.project, fv, config.registry.enable_online_feature_view_versioning)
    names = sorted(schema)  # rows are written in (entity_key, feature_name) order: B-tree appends
    ek = _entity_keys(table, keys)
    order = np.argsort(np.array(ek, dtype=object), kind="stable")
    table = table.take(pa.array(order))
    ek = [ek[i] for i in order]
    ts = _sqlite_event_ts(as_of)
    conn = sqlite3.connect(db, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
    try:
        _journal_wal(conn, db)
        for pragma in ("synchronous=NORMAL", "temp_store=MEMORY", "cache_size=-262144"):
            conn.execute(f"PRAGMA {pragma}")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (tbl,)).fetchone() is None:
            raise RuntimeError(f"online table {tbl} does not exist in {db}: run features.store.apply first")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _bulk_f (name TEXT, voff INTEGER, vlen INTEGER, "
                     "toff INTEGER, tlen INTEGER, d INTEGER)")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _bulk_s (k BLOB, b BLOB)")
        conn.execute("BEGIN IMMEDIATE")
        rebuild = (not _is_clustered(conn, tbl)
                   or conn.execute(f"SELECT 1 FROM {quote_sql_id(tbl)} LIMIT 1").fetchone() is not None)
        target = tbl + _NEW_SUFFIX if rebuild else tbl
        if rebuild:
            conn.execute(f"DROP TABLE IF EXISTS {quote_sql_id(target)}")
            create_online_table(conn, target)
        cols = ", ".join(ONLINE_COLUMNS)
        # value: the slot cut to its length; value_text: its slot, 0xFF meaning NULL
        sql = (f"INSERT INTO {quote_sql_id(target)} (entity_key, feature_name, value, value_text, event_ts, "
               "created_ts) SELECT s.k, f.name, "
               "substr(s.b, f.voff, CAST(substr(s.b, f.vlen, f.d) AS INTEGER)), "
               "CAST(NULLIF(substr(s.b, f.toff, CAST(substr(s.b, f.tlen, f.d) AS INTEGER)), ?) AS TEXT), "
               "?, NULL FROM _bulk_s AS s CROSS JOIN _bulk_f AS f WHERE true "
               "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
               "value_text = excluded.value_text, event_ts = excluded.event_ts, "
               "created_ts = excluded.created_ts")
        starts = range(0, table.num_rows, CHUNK_ROWS)

        def stage(start: int) -> tuple[list[tuple], list[tuple]]:
            return _stage_chunk(table.slice(start, CHUNK_ROWS), ek[start:start + CHUNK_ROWS], names, schema)

        # numpy/Python prepare chunk i+1 in a thread while SQLite (which releases the GIL) inserts chunk i
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(stage, starts[0]) if len(starts) else None
            for j in range(len(starts)):
                assert pending is not None
                f_rows, s_rows = pending.result()
                pending = pool.submit(stage, starts[j + 1]) if j + 1 < len(starts) else None
                conn.execute("DELETE FROM _bulk_f")
                conn.executemany("INSERT INTO _bulk_f VALUES (?, ?, ?, ?, ?, ?)", f_rows)
                conn.execute("DELETE FROM _bulk_s")
                conn.executemany("INSERT INTO _bulk_s VALUES (?, ?)", s_rows)
                del s_rows
                conn.execute(sql, (_NULL_TEXT, ts))
        conn.execute("DELETE FROM _bulk_s")
        if rebuild:
            # rows the snapshot does not overwrite stay, as with Feast's upsert; one ordered pass
            conn.execute(f"INSERT INTO {quote_sql_id(target)} ({cols}) SELECT {cols} FROM {quote_sql_id(tbl)} "
                         f"AS o WHERE NOT EXISTS (SELECT 1 FROM {quote_sql_id(target)} AS t "
                         "WHERE t.entity_key = o.entity_key AND t.feature_name = o.feature_name)")
            conn.execute(f"DROP TABLE {quote_sql_id(tbl)}")
            conn.execute(f"ALTER TABLE {quote_sql_id(target)} RENAME TO {quote_sql_id(tbl)}")
            create_online_index(conn, tbl)
        conn.execute("COMMIT")
        # copy the WAL into the database now; a reader still on the old snapshot is not waited for long
        conn.execute(f"PRAGMA busy_timeout={_CHECKPOINT_WAIT_MS}")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def _bytes_column(values: list[bytes]) -> _Encoded:
    """Variable-length bytes (one per row) as an ``_Encoded`` column."""
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.frombuffer(b"".join(values), dtype=np.uint8)
    return _Encoded(_place(flat, offsets, np.zeros(len(values), dtype=np.int64),
                           int(lengths.max()) if len(values) else 0), lengths)


def _constant(value: bytes, n: int) -> _Encoded:
    return _Encoded(np.tile(np.frombuffer(value, np.uint8), (n, 1)), np.full(n, len(value), dtype=np.int64))


def _resp_length(lens: np.ndarray) -> _Encoded:
    """RESP bulk-string headers ``$<len>\r\n`` for every row."""
    n = len(lens)
    nd = np.ones(n, dtype=np.int64)
    for k in range(1, 10):
        nd += lens >= 10**k
    width = 1 + int(nd.max() if n else 1) + 2
    out = np.zeros((n, width), dtype=np.uint8)
    out[:, 0] = ord("$")
    rows = np.arange(n)
    for j in range(width - 3):
        digit = (lens // 10 ** np.maximum(nd - 1 - j, 0)) % 10 + 48
        out[rows, 1 + j] = np.where(j < nd, digit, out[rows, 1 + j])
    out[rows, 1 + nd] = 13
    out[rows, 2 + nd] = 10
    return _Encoded(out, 3 + nd)


_CRLF = b"\r\n"
# Server-side read of the stored timestamps of many keys in one call (Feast's dedup rule needs them)
_TS_SCRIPT = ("local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('HGET', k, ARGV[1]) or '' end "
              "return r")


def _write_redis(settings: Settings, fv: Any, table: pa.Table, keys: tuple[str, ...],
                 schema: dict[str, DType], as_of: datetime) -> None:
    """HSET per entity in Feast's hash layout, the commands built as raw RESP for whole chunks at once."""
    from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name
    from google.protobuf.timestamp_pb2 import Timestamp

    from features.store import feature_store

    store = feature_store(settings)
    config = store.config
    online_cfg = config.online_store
    redis_type = str(getattr(online_cfg.redis_type, "value", online_cfg.redis_type))
    if redis_type != "redis" or online_cfg.key_ttl_seconds:
        raise BulkLayoutError("the bulk Redis writer handles a single Redis without key_ttl_seconds only")
    client = store._get_provider().online_store._get_client(online_cfg)
    fv_name = compute_versioned_name(fv, config.registry.enable_online_feature_view_versioning)
    ts_key = f"_ts:{fv_name}".encode()
    proto_ts = Timestamp()
    proto_ts.FromDatetime(as_of)
    ts_bytes = proto_ts.SerializeToString()
    new_nanos = proto_ts.seconds * 1_000_000_000 + proto_ts.nanos
    names = list(schema)
    project = config.project.encode()
    nargs = 2 + 2 * (len(names) + 1)
    head = f"*{nargs}\r\n$4\r\nHSET\r\n".encode()
    ts_part = b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ts_key), ts_key, len(ts_bytes), ts_bytes)
    field_parts = [b"$4\r\n" + _mmh3(f"{fv_name}:{name}") + _CRLF for name in names]
    script = client.register_script(_TS_SCRIPT)
    for start in range(0, table.num_rows, CHUNK_ROWS):
        chunk = table.slice(start, CHUNK_ROWS)
        n = chunk.num_rows
        redis_keys = [k + project for k in _entity_keys(chunk, keys)]
        keep = np.ones(n, dtype=bool)
        if not online_cfg.skip_dedup:
            for i, prev in enumerate(script(keys=redis_keys, args=[ts_key])):
                if prev:
                    old = Timestamp()
                    old.ParseFromString(prev)
                    keep[i] = new_nanos > old.seconds * 1_000_000_000 + old.nanos
        key_col = _bytes_column(redis_keys)
        crlf = _constant(_CRLF, n)
        parts = [_resp_length(key_col.lens), key_col, crlf, _constant(ts_part, n)]
        for name, fpart in zip(names, field_parts, strict=True):
            enc = _ENCODERS[schema[name]](chunk.column(name))
            parts += [_constant(fpart, n), _resp_length(enc.lens), enc, crlf]
        sent = int(keep.sum())
        if not sent:
            continue
        if sent == n:
            payload, _ = _rows_flat(parts, prefix=head)
        else:
            commands = _rows_to_bytes(parts, prefix=head)
            payload = b"".join(c for c, k in zip(commands, keep, strict=True) if k)
        conn = client.connection_pool.get_connection()
        try:
            conn.send_packed_command([payload])
            for _ in range(sent):
                conn.read_response()  # raises on an error reply
        except BaseException:
            conn.disconnect()
            raise
        finally:
            client.connection_pool.release(conn)


def _write_feast(settings: Settings, view: str, table: pa.Table) -> None:
    from features.store import feature_store

    store = feature_store(settings)
    store.write_to_online_store(view, df=table.to_pandas())


def load_online(settings: Settings, view: str, as_of: str | None = None,
                method: Literal["bulk", "feast"] = "bulk") -> LoadReport:
    """Load the snapshot of ``view`` at ``as_of`` (default: the latest) into the online store.

    ``feast`` runs ``FeatureStore.materialize`` over the snapshot's instant (the reference); ``bulk``
    writes Feast's exact layout in bulk (see the module docstring), falling back to Feast's writer with a
    warning when the layout check fails. Either way ``get_online_features`` reads the same values.
    The views must have been applied (``features.store.apply``).
    """
    from features.store import feature_store

    if view not in FEATURE_VIEWS:
        raise KeyError(f"unknown feature view {view!r}; the views are {', '.join(FEATURE_VIEWS)}")
    if method not in ("bulk", "feast"):
        raise ValueError(f"method must be 'bulk' or 'feast', not {method!r}")
    as_of = as_of or latest_as_of(settings, view)
    t0 = time.perf_counter()
    table = read_snapshot(settings, view, as_of)
    if method == "feast":
        when = _as_of_datetime(table)
        feature_store(settings).materialize(start_date=when, end_date=when, feature_views=[view])
        used = "feast"
    else:
        used = _write_table(settings, view, table)
    seconds = time.perf_counter() - t0
    log.info("loaded %d rows of %s as of %s into the online store by %s in %.1f s", table.num_rows, view,
             as_of, used, seconds)
    return LoadReport(view=view, rows=table.num_rows, seconds=seconds, method=used, as_of=as_of)


def write_online(settings: Settings, view: str, table: pa.Table) -> LoadReport:
    """Write ``table`` (the view's keys, ``as_of`` with one value, its schema's columns) into the online store
    rows of the applied view ``view``, replacing what the store held for those entities when older: the bulk
    writer with Feast's writer as the fallback, as :func:`load_online`. For tables that are not feature
    snapshots (``repurchase score``'s ``member_scores``)."""
    from features.definitions import VIEW_KEYS, view_schema

    expected = [*VIEW_KEYS[view], C.AS_OF, *view_schema(settings, view)]
    missing = [c for c in expected if c not in table.column_names]
    if missing:
        raise ValueError(f"table for the online view {view} lacks column(s) {', '.join(missing)}")
    if len(pc.unique(table.column(C.AS_OF))) != 1:
        raise ValueError(f"table for the online view {view}: {C.AS_OF} must hold one value")
    t0 = time.perf_counter()
    used = _write_table(settings, view, table.select(expected))
    as_of = _as_of_datetime(table).date().isoformat()
    return LoadReport(view=view, rows=table.num_rows, seconds=time.perf_counter() - t0, method=used, as_of=as_of)


def require_view(settings: Settings, view: str) -> Any:
    """The registered FeatureView ``view``, or a LookupError saying to apply the definitions."""
    from feast.errors import FeatureViewNotFoundException

    from features.store import feature_store

    try:
        return feature_store(settings).get_feature_view(view)
    except FeatureViewNotFoundException:
        raise LookupError(f"the Feast registry of project {settings.feast.project} has no view {view!r}: run "
                          "`repurchase features apply` (the daily run applies before it writes)") from None


def _write_table(settings: Settings, view: str, table: pa.Table) -> str:
    """Bulk-write ``table`` into ``view``'s online rows (Feast's writer when the layout check fails); the
    method used."""
    from features.definitions import VIEW_KEYS, view_schema

    keys, schema, when = VIEW_KEYS[view], view_schema(settings, view), _as_of_datetime(table)
    fv = require_view(settings, view)
    writer = _write_redis if settings.profile == "production" else _write_sqlite
    try:
        check_layout(table, keys, schema)
        writer(settings, fv, table, keys, schema, when)  # raises BulkLayoutError before writing only
    except BulkLayoutError as e:
        warnings.warn(f"bulk online load of {view} falls back to Feast's writer: {e}", RuntimeWarning,
                      stacklevel=3)
        log.warning("bulk online load of %s falls back to Feast's writer: %s", view, e)
        _write_feast(settings, view, table)
        return "feast-write"
    return "bulk"
