"""Ingest raw files into the lake through a column mapping, with validation and quarantine.

``ingest`` reads each table's files (csv, parquet or whitespace-separated text) chunk by chunk, maps the
source columns to the contract's (features/mapping.py), normalises types (identifiers as text, timestamps
tz-aware UTC at microsecond precision, floats, bools), checks every row and puts the bad ones aside with
the reason. Then, across all files of a table, DuckDB finds exact duplicates and rows sharing the table key,
checks references (members and items), derives the members and items tables when the mapping says so, and
writes the lake (features/lake.py layout) atomically: either every table of the run is replaced, or, on
any error, the previous lake is left as it was.

What is an error of the file and what is an error of a row:

- a file that is empty, does not decode in its declared encoding (byte offset and line named), lacks a
  column the mapping reads, or has columns the mapping neither reads nor ignores, raises ``IngestError``;
  so does a table where more than ``settings.ingest.max_reject_share`` of the rows are bad (nothing is
  written to the lake then; the rejects file is, so the reasons can be read);
- a bad row (a missing identifier, an unparseable date or number, a negative price, a future timestamp, a
  duplicate, ...) goes to ``<rejects>/<table>-<run id>.csv`` with its original source values, the file, its
  line number (header = line 1; the 1-based row number for parquet) and the reason. Counts reconcile:
  read = accepted + rejected for every table.

Example::

    from features.ingest import ingest, sources_from_dir
    report = ingest(sources_from_dir(raw_dir, "demo"), "demo", settings)
    report.reconciles                   # True
    report.tables["transactions"].rejected_by_reason
"""

from __future__ import annotations

import ast
import codecs
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features import lake
from features.contract import ARMS, CAMPAIGNS, ITEMS, MEMBERS, REJECT_COLUMNS, TRANSACTIONS, C, Table
from features.mapping import Mapping, TableMapping, load_mapping, parse_expression
from features.settings import Settings

log = logging.getLogger(__name__)

CSV_CHUNK_ROWS = 500_000
PARQUET_BATCH_ROWS = 1_000_000
NOT_A_PRODUCT = "not a product line"
# Tables in the order they are processed: references (members, items) before what refers to them.
ORDER = (MEMBERS.name, ITEMS.name, TRANSACTIONS.name, CAMPAIGNS.name)
_TABLES = {t.name: t for t in (TRANSACTIONS, MEMBERS, ITEMS, CAMPAIGNS)}
_ARROW = {"string": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"), "float": pa.float64(),
          "int": pa.int64(), "bool": pa.bool_()}
_TRUE = {"true", "t", "yes", "y", "1", "1.0"}
_FALSE = {"false", "f", "no", "n", "0", "0.0"}
_ITEM_NAME = "_item_name"  # carried beside transactions when the mapping derives item names
_COMMON_ENCODINGS = ("utf_8", "ascii", "cp1252", "latin_1", "iso8859_15")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class IngestError(ValueError):
    """A file or a run that cannot be ingested; the message names the file and what is wrong."""


@dataclass
class TableReport:
    """Counts of one table. ``accepted`` counts source rows that reached the lake (several may be summed
    into one line); ``written`` counts the rows of the lake table after the run."""

    table: str
    files: list[str] = field(default_factory=list)
    read: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    written: int = 0
    replaced: int = 0  # append mode: lake rows replaced by new rows with the same key
    derived: bool = False
    lake_path: str | None = None
    rejects_path: str | None = None

    @property
    def reconciles(self) -> bool:
        return self.read == self.accepted + self.rejected

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "files": self.files, "read": self.read, "accepted": self.accepted,
                "rejected": self.rejected, "rejected_by_reason": self.rejected_by_reason,
                "written": self.written, "replaced": self.replaced, "derived": self.derived,
                "reconciles": self.reconciles, "lake_path": self.lake_path, "rejects_path": self.rejects_path}


@dataclass
class IngestReport:
    """What one ingest run read, accepted, rejected (by reason) and wrote."""

    run_id: str
    mapping: str
    mode: str
    tables: dict[str, TableReport]
    seconds: float = 0.0

    @property
    def reconciles(self) -> bool:
        return all(t.reconciles for t in self.tables.values())

    @property
    def paths(self) -> dict[str, str]:
        """Every file or folder written: lake tables and rejects files."""
        out = {}
        for t in self.tables.values():
            if t.lake_path:
                out[t.table] = t.lake_path
            if t.rejects_path:
                out[f"{t.table}_rejects"] = t.rejects_path
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "mapping": self.mapping, "mode": self.mode,
                "reconciles": self.reconciles, "seconds": round(self.seconds, 3),
                "tables": {k: v.to_dict() for k, v in self.tables.items()}, "paths": self.paths}


def sources_from_dir(path: str | Path, mapping: Mapping | str | Path) -> dict[str, list[Path]]:
    """The files of a raw folder per table, found by the mapping's ``files`` patterns (sorted, no repeats).
    Tables without a file are left out."""
    root = Path(path)
    if not root.is_dir():
        raise IngestError(f"raw folder {root} does not exist")
    m = load_mapping(mapping)
    out: dict[str, list[Path]] = {}
    for name, tm in m.tables.items():
        found = dict.fromkeys(p for pat in tm.files for p in sorted(root.glob(pat)) if p.is_file())
        if found:
            out[name] = list(found)
    if not out:
        patterns = {n: list(t.files) for n, t in m.tables.items()}
        raise IngestError(f"no file in {root} matches the patterns of mapping {m.name!r}: {patterns}")
    return out


def ingest(sources: dict[str, list[Path]], mapping: Mapping | str | Path, settings: Settings,
           mode: Literal["append", "replace"] = "replace", run_id: str | None = None) -> IngestReport:
    """Ingest ``sources`` (table -> files) through ``mapping`` (a built-in name, a YAML path or a Mapping).

    ``replace`` rewrites each table the run touches from its files alone; ``append`` merges the new rows
    with the lake's, a new row replacing a lake row with the same key. Tables the run does not touch stay
    as they are. Raises IngestError for a bad file or too many bad rows, leaving the lake untouched.
    """
    if mode not in ("append", "replace"):
        raise ValueError(f"mode must be 'append' or 'replace', not {mode!r}")
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id {run_id!r} may hold only letters, digits, '_', '.', '-'")
    m = load_mapping(mapping)
    run = _Run(m, settings, mode, run_id, {k: [Path(p) for p in v] for k, v in sources.items()})
    return run.execute()


# --- the run ---------------------------------------------------------------------------------------------


@dataclass
class _Staged:
    table: Table
    report: TableReport
    files: list[Path]
    accepted_dir: Path
    rejects_dir: Path
    source_columns: list[str] = field(default_factory=list)


class _Run:
    def __init__(self, mapping: Mapping, settings: Settings, mode: str, run_id: str,
                 sources: dict[str, list[Path]]) -> None:
        self.m, self.settings, self.mode, self.run_id, self.sources = mapping, settings, mode, run_id, sources
        now = datetime.now(UTC)
        self.run_end = pd.Timestamp(datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1))
        self.files: list[Path] = []  # global file index -> path (the _file column)
        self.staged: dict[str, _Staged] = {}
        self.reports: dict[str, TableReport] = {}
        self.final: dict[str, str] = {}  # table -> DuckDB table holding its final rows

    # --- orchestration

    def execute(self) -> IngestReport:
        t0 = time.perf_counter()
        self._check_sources()
        dirs = self.settings.dirs
        work = dirs.lake.parent / f".ingest-{self.run_id}"
        work.mkdir(parents=True, exist_ok=False)
        self.work = work
        try:
            self.con = lake.connect_duckdb(work / "ingest.duckdb")
            self.con.execute("SET TimeZone = 'UTC'")
            self.con.execute("SET enable_progress_bar = false")
            self.con.execute(f"SET temp_directory = '{_sql_path(work / 'duckdb-tmp')}'")
            self.con.execute("SET preserve_insertion_order = false")
            for name in ORDER:
                if name in self.sources:
                    self._stage(name)
            for name in ORDER:
                if name in self.sources:
                    self._classify(name)
                    if name == TRANSACTIONS.name:
                        self._derive()
            self._write_rejects()
            self._check_share()
            self._write_lake()
        finally:
            con = getattr(self, "con", None)
            if con is not None:
                con.close()
            shutil.rmtree(work, ignore_errors=True)
        report = IngestReport(self.run_id, self.m.name, self.mode,
                              {n: self.reports[n] for n in ORDER if n in self.reports},
                              time.perf_counter() - t0)
        for t in report.tables.values():
            log.info("ingest %s: read %d, accepted %d, rejected %d, written %d", t.table, t.read, t.accepted,
                     t.rejected, t.written)
        if not report.reconciles:  # a bug, never expected: say so loudly rather than write a silent loss
            raise IngestError(f"counts do not reconcile: {report.to_dict()['tables']}")
        return report

    def _check_sources(self) -> None:
        derived = {MEMBERS.name} if self.m.derive_members else set()
        if self.m.derive_items is not None:
            derived.add(ITEMS.name)
        for name, files in self.sources.items():
            if name not in _TABLES:
                raise IngestError(f"unknown table {name!r} in sources; the contract has {', '.join(_TABLES)}")
            if name in derived:
                raise IngestError(f"mapping {self.m.name!r} derives the {name} table from the transactions; "
                                  f"it reads no {name} files (got {', '.join(map(str, files))})")
            if name not in self.m.tables:
                raise IngestError(f"mapping {self.m.name!r} has no {name} table; it maps "
                                  f"{', '.join(self.m.tables)}")
            if not files:
                raise IngestError(f"no files given for table {name}")
            for f in files:
                if not f.is_file():
                    raise IngestError(f"{name} file {f} does not exist")
        if not self.sources:
            raise IngestError("no sources given")

    # --- stage 1: read, map, normalise and check each file, chunk by chunk

    def _stage(self, name: str) -> None:
        tm = self.m.tables[name]
        table = _TABLES[name]
        report = TableReport(name, files=[str(f) for f in self.sources[name]])
        st = _Staged(table, report, self.sources[name], self.work / name / "accepted",
                     self.work / name / "rejects")
        st.accepted_dir.mkdir(parents=True)
        st.rejects_dir.mkdir(parents=True)
        self.staged[name] = st
        self.reports[name] = report
        extra = {}
        if name == TRANSACTIONS.name and self.m.derive_items is not None and self.m.derive_items.name:
            extra[_ITEM_NAME] = self.m.derive_items.name
        tz = tm.timezone or self.settings.ingest.default_timezone
        for path in self.sources[name]:
            file_id = len(self.files)
            self.files.append(path)
            reader = _Reader(path, tm, name, extra)
            for k, (first_line, raw) in enumerate(reader.chunks()):
                report.read += len(raw)
                norm = _Normaliser(raw, reader, table, tm, tz, self.run_end, extra)
                ok, bad = norm.run()
                rows = first_line + np.arange(len(raw), dtype=np.int64)
                if ok.any():
                    self._write_accepted(st, norm, ok, rows, file_id, k)
                if bad.any():
                    rej = _raw_as_text(raw.loc[bad])
                    rej[C.SOURCE_FILE] = str(path)
                    rej[C.SOURCE_ROW] = rows[bad]
                    rej[C.REASON] = norm.errors.reason[bad]
                    rej["_kind"] = norm.errors.kind[bad]
                    rej.to_parquet(st.rejects_dir / f"f{file_id}-c{k}.parquet", index=False)
            st.source_columns.extend(c for c in reader.columns if c not in st.source_columns)
            log.info("staged %s file %s", name, path)

    def _write_accepted(self, st: _Staged, norm: _Normaliser, ok: np.ndarray, rows: np.ndarray,
                        file_id: int, k: int) -> None:
        arrays, fields = [], []
        for col in st.table.columns:
            arrays.append(_arrow_array(norm.out[col.name][ok], col.dtype))
            fields.append(pa.field(col.name, _ARROW[col.dtype]))
        for name, values in norm.extra.items():
            arrays.append(_arrow_array(values[ok], "string"))
            fields.append(pa.field(name, pa.string()))
        arrays += [pa.array(np.full(int(ok.sum()), file_id, dtype=np.int32)), pa.array(rows[ok])]
        fields += [pa.field("_file", pa.int32()), pa.field("_row", pa.int64())]
        pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)),
                       st.accepted_dir / f"f{file_id}-c{k}.parquet")

    # --- stage 2: across files, with DuckDB: references, duplicates, key conflicts, append

    def _classify(self, name: str) -> None:
        """Across all files of a table: references, exact duplicates, key conflicts; then fin_<table>.

        Windows run only over the rows whose key occurs more than once, so a clean table of millions of
        rows costs one GROUP BY, not a sort of every row."""
        st = self.staged[name]
        tm = self.m.tables[name]
        t = st.table
        q = _quote
        cols = [c.name for c in t.columns]
        carry = [_ITEM_NAME] if (name == TRANSACTIONS.name and self.m.derive_items is not None
                                 and self.m.derive_items.name) else []
        all_cols = ", ".join(q(c) for c in cols)
        key = ", ".join(q(c) for c in t.key)
        keys = ", ".join(t.key)
        sel = ", ".join(q(c) for c in [*cols, *carry])
        con = self.con
        con.execute("CREATE OR REPLACE TABLE _files (_file INTEGER, _name VARCHAR)")
        con.executemany("INSERT INTO _files VALUES (?, ?)", [(i, p.name) for i, p in enumerate(self.files)])
        con.execute(f"CREATE OR REPLACE TABLE rej_{name} (_file INTEGER, _row BIGINT, _reason VARCHAR, "
                    "_kind VARCHAR)")
        if any(st.accepted_dir.iterdir()):
            src = f"read_parquet('{_sql_path(st.accepted_dir)}/*.parquet')"
        else:
            typed = ", ".join([*(f"NULL::{_DUCK[c.dtype]} AS {q(c.name)}" for c in t.columns),
                               *(f"NULL::VARCHAR AS {q(c)}" for c in carry)])
            src = f"(SELECT {typed}, NULL::INTEGER AS _file, NULL::BIGINT AS _row LIMIT 0)"
        refs = self._references(name)
        semi = " ".join(f"SEMI JOIN (SELECT DISTINCT {q(col)} AS _k FROM {ref_sql}) _r{i} "
                        f"ON s.{q(col)} = _r{i}._k" for i, (col, _, ref_sql) in enumerate(refs))
        con.execute(f"CREATE OR REPLACE VIEW v_{name} AS SELECT s.* FROM {src} s {semi}")
        if refs:
            joins = " ".join(f"LEFT JOIN (SELECT DISTINCT {q(col)} AS _k FROM {ref_sql}) _r{i} "
                             f"ON s.{q(col)} = _r{i}._k" for i, (col, _, ref_sql) in enumerate(refs))
            reason = " ".join(f"WHEN _r{i}._k IS NULL THEN "
                              f"'unknown {col} ''' || s.{q(col)} || ''' (not in {ref})'"
                              for i, (col, ref, _) in enumerate(refs))
            kind = " ".join(f"WHEN _r{i}._k IS NULL THEN 'unknown {col}'"
                            for i, (col, _, _) in enumerate(refs))
            where = " OR ".join(f"_r{i}._k IS NULL" for i in range(len(refs)))
            con.execute(f"INSERT INTO rej_{name} SELECT s._file, s._row, CASE {reason} END, CASE {kind} END "
                        f"FROM {src} s {joins} WHERE {where}")
        con.execute(f"CREATE OR REPLACE TABLE mk_{name} AS SELECT {key} FROM v_{name} GROUP BY {key} "
                    "HAVING count(*) > 1")
        con.execute(f"CREATE OR REPLACE TABLE multi_{name} AS SELECT v.* FROM v_{name} v "
                    f"SEMI JOIN mk_{name} USING ({key})")
        in_file = ("CASE WHEN {f} = _file THEN '' ELSE ' in ' || "
                   "(SELECT _name FROM _files WHERE _files._file = {f}) END")
        if tm.drop_exact_duplicates:
            x = (f"SELECT *, row_number() OVER w AS _rn_x, first_value(_file) OVER w AS _f_x, "
                 f"first_value(_row) OVER w AS _r_x FROM multi_{name} "
                 f"WINDOW w AS (PARTITION BY {all_cols} ORDER BY _file, _row)")
        else:
            x = f"SELECT *, 1 AS _rn_x, NULL::INTEGER AS _f_x, NULL::BIGINT AS _r_x FROM multi_{name}"
        policy = tm.on_key_conflict
        if policy == "reject":
            k_reason = (f"CASE WHEN _rn_k > 1 THEN 'same key ({keys}) as source row ' || _r_k "
                        f"|| {in_file.format(f='_f_k')} || ' with different values' END")
            k_kind = "CASE WHEN _rn_k > 1 THEN 'key conflict' END"
        elif policy == "last":
            k_reason = ("CASE WHEN _rl_k > 1 THEN 'superseded by source row ' || _rl_row || "
                        f"{in_file.format(f='_fl_k')} || ' with the same key ({keys})' END")
            k_kind = "CASE WHEN _rl_k > 1 THEN 'superseded by a later row with the same key' END"
        else:  # sum: lines of one key add up; they must belong to the same member
            k_reason = (f"CASE WHEN {q(C.MEMBER_ID)} IS DISTINCT FROM _m_k THEN 'same order line as source "
                        f"row ' || _r_k || {in_file.format(f='_f_k')} || ' but another member_id' END")
            k_kind = f"CASE WHEN {q(C.MEMBER_ID)} IS DISTINCT FROM _m_k THEN 'key conflict' END"
        member_first = f"first_value({q(C.MEMBER_ID)}) OVER wf" if C.MEMBER_ID in cols else "NULL::VARCHAR"
        con.execute(f"""
            CREATE OR REPLACE TABLE cls_{name} AS
            WITH x AS ({x}),
            k AS (SELECT *, row_number() OVER wf AS _rn_k, row_number() OVER wl AS _rl_k,
                         first_value(_file) OVER wf AS _f_k, first_value(_row) OVER wf AS _r_k,
                         first_value(_file) OVER wl AS _fl_k, first_value(_row) OVER wl AS _rl_row,
                         {member_first} AS _m_k
                  FROM x WHERE _rn_x = 1
                  WINDOW wf AS (PARTITION BY {key} ORDER BY _file, _row),
                         wl AS (PARTITION BY {key} ORDER BY _file DESC, _row DESC))
            SELECT {sel}, _file, _row, 'duplicate of source row ' || _r_x || {in_file.format(f='_f_x')}
                   AS _reason, 'duplicate row' AS _kind FROM x WHERE _rn_x > 1
            UNION ALL
            SELECT {sel}, _file, _row, {k_reason}, {k_kind} FROM k""")
        con.execute(f"INSERT INTO rej_{name} SELECT _file, _row, _reason, _kind FROM cls_{name} "
                    "WHERE _reason IS NOT NULL")
        if policy == "sum":
            aggs = []
            for c in [*cols, *carry]:
                if c in t.key:
                    aggs.append(q(c))
                elif c in (C.QUANTITY, C.AMOUNT, C.DISCOUNT):
                    aggs.append(f"sum({q(c)}) AS {q(c)}")
                elif c == C.TS:
                    aggs.append(f"min({q(c)}) AS {q(c)}")
                else:
                    aggs.append(f"first({q(c)} ORDER BY _file, _row) FILTER (WHERE {q(c)} IS NOT NULL) "
                                f"AS {q(c)}")
            multi_ok = (f"SELECT {', '.join(aggs)}, count(*) AS _n FROM cls_{name} WHERE _reason IS NULL "
                        f"GROUP BY {key}")
        else:
            multi_ok = f"SELECT {sel}, 1 AS _n FROM cls_{name} WHERE _reason IS NULL"
        new = (f"SELECT {sel}, 1 AS _n FROM v_{name} ANTI JOIN mk_{name} USING ({key}) "
               f"UNION ALL BY NAME {multi_ok}")
        if self.mode == "append" and self._lake_exists(name):
            lake_cols = ", ".join([*(q(c) for c in cols), *(f"NULL::VARCHAR AS {q(c)}" for c in carry)])
            con.execute(f"""
                CREATE OR REPLACE TABLE fin_{name} AS
                SELECT {sel}, _n FROM (SELECT * FROM ({new})
                                       UNION ALL BY NAME
                                       SELECT {lake_cols}, 0 AS _n FROM {self._lake_sql(name)})
                QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY _n DESC) = 1""")
            before = self._scalar(f"SELECT count(*) FROM {self._lake_sql(name)}")
            kept = self._scalar(f"SELECT count(*) FROM fin_{name} WHERE _n = 0")
            self.reports[name].replaced = before - kept
        else:
            con.execute(f"CREATE OR REPLACE TABLE fin_{name} AS {new}")
        self.final[name] = f"fin_{name}"
        st.report.accepted = self._scalar(f"SELECT sum(_n) FROM fin_{name}")
        self._quarantine_late(name)

    def _references(self, name: str) -> list[tuple[str, str, str]]:
        """(column, referenced table, SQL of its rows) for the members/items a row of ``name`` refers to."""
        if not self.m.check_references or name not in (TRANSACTIONS.name, CAMPAIGNS.name):
            return []
        refs = [(C.MEMBER_ID, MEMBERS.name)]
        if name == TRANSACTIONS.name:
            refs.append((C.ITEM_ID, ITEMS.name))
        out = []
        for col, ref in refs:
            src = self._reference_table(ref)
            if src is not None:
                out.append((col, ref, src))
        return out

    def _reference_table(self, ref: str) -> str | None:
        """SQL source of the rows a reference is checked against, or None when there is nothing to check."""
        if ref in self.final:
            return self.final[ref]
        if (ref == MEMBERS.name and self.m.derive_members) or (ref == ITEMS.name and self.m.derive_items):
            return None  # derived from the transactions themselves
        if self._lake_exists(ref):
            return self._lake_sql(ref)
        return None

    def _quarantine_late(self, name: str) -> None:
        """Rows rejected by DuckDB (references, duplicates, key conflicts) get their source values back
        from the files and join the rejects of stage 1."""
        st = self.staged[name]
        late = self.con.execute(
            f"SELECT _file, _row, _reason, _kind FROM rej_{name} ORDER BY _file, _row").df()
        if late.empty:
            return
        tm = self.m.tables[name]
        for file_id, part in late.groupby("_file", sort=True):
            path = self.files[int(file_id)]
            reader = _Reader(path, tm, name, {})
            raw = reader.rows(part["_row"].to_numpy(dtype=np.int64))
            rej = _raw_as_text(raw)
            rej[C.SOURCE_FILE] = str(path)
            rej[C.SOURCE_ROW] = part["_row"].to_numpy(dtype=np.int64)
            rej[C.REASON] = part["_reason"].to_numpy()
            rej["_kind"] = part["_kind"].to_numpy()
            rej.to_parquet(st.rejects_dir / f"late-f{int(file_id)}.parquet", index=False)

    # --- derived tables

    def _derive(self) -> None:
        q = _quote
        tx = self.final[TRANSACTIONS.name]
        if self.m.derive_members:
            new = (f"SELECT {q(C.MEMBER_ID)}, min({q(C.TS)}) AS {q(C.JOINED_AT)} FROM {tx} "
                   f"GROUP BY {q(C.MEMBER_ID)}")
            others = [c.name for c in MEMBERS.columns if c.name not in (C.MEMBER_ID, C.JOINED_AT)]
            if self.mode == "append" and self._lake_exists(MEMBERS.name):
                lk = self._lake_sql(MEMBERS.name)
                sql = (f"SELECT coalesce(n.{q(C.MEMBER_ID)}, l.{q(C.MEMBER_ID)}) AS {q(C.MEMBER_ID)}, "
                       f"least(n.{q(C.JOINED_AT)}, l.{q(C.JOINED_AT)}) AS {q(C.JOINED_AT)}, "
                       + ", ".join(f"l.{q(c)}" for c in others)
                       + f" FROM ({new}) n FULL OUTER JOIN {lk} l USING ({q(C.MEMBER_ID)})")
            else:
                sql = "SELECT *, " + ", ".join(
                    f"NULL::{_DUCK[MEMBERS.dtype(c)]} AS {q(c)}" for c in others) + f" FROM ({new})"
            self.con.execute(f"CREATE OR REPLACE TABLE fin_{MEMBERS.name} AS {sql}")
            self.final[MEMBERS.name] = f"fin_{MEMBERS.name}"
            self.reports[MEMBERS.name] = TableReport(MEMBERS.name, derived=True)
        if self.m.derive_items is not None:
            name_sql = f"mode({q(_ITEM_NAME)})" if self.m.derive_items.name else "NULL::VARCHAR"
            new = (f"SELECT {q(C.ITEM_ID)}, coalesce(mode({q(C.CATEGORY)}), 'unknown') AS {q(C.CATEGORY)}, "
                   f"median({q(C.AMOUNT)} / {q(C.QUANTITY)}) FILTER (WHERE NOT {q(C.IS_RETURN)} AND "
                   f"{q(C.QUANTITY)} > 0) AS {q(C.PRICE)}, NULL::BOOLEAN AS {q(C.REPLENISHABLE)}, "
                   f"{name_sql} AS {q(C.ITEM_NAME)} FROM {tx} GROUP BY {q(C.ITEM_ID)}")
            if self.mode == "append" and self._lake_exists(ITEMS.name):
                lk = self._lake_sql(ITEMS.name)
                new = (f"SELECT * FROM ({new}) UNION ALL BY NAME SELECT * FROM {lk} "
                       f"WHERE {q(C.ITEM_ID)} NOT IN (SELECT {q(C.ITEM_ID)} FROM {tx})")
            self.con.execute(f"CREATE OR REPLACE TABLE fin_{ITEMS.name} AS {new}")
            self.final[ITEMS.name] = f"fin_{ITEMS.name}"
            self.reports[ITEMS.name] = TableReport(ITEMS.name, derived=True)

    # --- checks and outputs

    def _write_rejects(self) -> None:
        for name, st in self.staged.items():
            report = st.report
            parts = sorted(st.rejects_dir.glob("*.parquet"))
            if not parts:
                continue
            src = f"read_parquet('{_sql_path(st.rejects_dir)}/*.parquet', union_by_name = true)"
            counts = self.con.execute(
                f"SELECT _kind, count(*) FROM {src} GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
            report.rejected_by_reason = {k: int(n) for k, n in counts}
            report.rejected = sum(report.rejected_by_reason.values())
            names = self.con.execute(f"SELECT * FROM {src} LIMIT 0").df().columns
            source_cols = [c for c in st.source_columns if c in names]
            cols = ", ".join(_quote(c) for c in [*source_cols, *REJECT_COLUMNS])
            target = self.settings.dirs.rejects / f"{name}-{self.run_id}.csv"
            with lake.atomic_path(target) as tmp:
                self.con.execute(f"COPY (SELECT {cols} FROM {src} ORDER BY {_quote(C.SOURCE_FILE)}, "
                                 f"{_quote(C.SOURCE_ROW)}) TO '{_sql_path(tmp)}' (FORMAT csv, HEADER)")
            report.rejects_path = str(target)
            log.warning("ingest %s: %d rows quarantined to %s", name, report.rejected, target)

    def _check_share(self) -> None:
        limit = self.settings.ingest.max_reject_share
        for name, st in self.staged.items():
            r = st.report
            bad = r.rejected - r.rejected_by_reason.get(NOT_A_PRODUCT, 0)
            if r.read and bad / r.read > limit:
                top = ", ".join(f"{k}: {n}" for k, n in list(r.rejected_by_reason.items())[:5])
                raise IngestError(
                    f"{name}: {bad} of {r.read} rows are bad ({bad / r.read:.1%}, more than "
                    f"settings.ingest.max_reject_share = {limit:.0%}) in {', '.join(r.files)}; nothing was "
                    f"written to the lake. Reasons: {top}. Rejected rows: {r.rejects_path}")
            if r.read == 0 and self.mode == "replace":
                raise IngestError(f"{name}: the files {', '.join(r.files)} hold no data rows; replacing the "
                                  "lake table with nothing was refused (use mode='append' for an empty "
                                  "delivery)")

    def _write_lake(self) -> None:
        """Every table of the run into a temporary folder beside its lake folder; all renamed at the end."""
        q = _quote
        with ExitStack() as stack:
            for name in ORDER:
                if name not in self.final:
                    continue
                t = _TABLES[name]
                src = self.final[name]
                cols = ", ".join(f"{q(c.name)}::{_DUCK[c.dtype]} AS {q(c.name)}" for c in t.columns)
                target = lake.table_dir(self.settings, name)
                tmp = stack.enter_context(lake.atomic_path(target))
                if name == TRANSACTIONS.name:
                    items = self._reference_table(ITEMS.name)
                    if items is not None:  # fill the category from the items table where absent
                        src = (f"(SELECT t.* REPLACE (coalesce(t.{q(C.CATEGORY)}, i._cat) "
                               f"AS {q(C.CATEGORY)}) "
                               f"FROM {src} t LEFT JOIN (SELECT {q(C.ITEM_ID)} AS _iid, "
                               f"any_value({q(C.CATEGORY)}) AS _cat FROM {items} GROUP BY 1) i "
                               f"ON t.{q(C.ITEM_ID)} = i._iid)")
                    # sorted by time so that readers filtering on ts skip row groups
                    self.con.execute("SET preserve_insertion_order = true")
                    self.con.execute(
                        f"COPY (SELECT {cols}, strftime({q(C.TS)}, '%Y-%m') AS month FROM {src} "
                        f"ORDER BY {q(C.TS)}, {q(C.MEMBER_ID)}) TO '{_sql_path(tmp)}' "
                        "(FORMAT parquet, PARTITION_BY (month), FILENAME_PATTERN 'part-{i}', "
                        "COMPRESSION zstd)")
                    self.con.execute("SET preserve_insertion_order = false")
                    if not tmp.exists():
                        tmp.mkdir()
                else:
                    tmp.mkdir()
                    order = ", ".join(q(c) for c in t.key)
                    self.con.execute(f"COPY (SELECT {cols} FROM {src} ORDER BY {order}) "
                                     f"TO '{_sql_path(tmp / lake.PART)}' (FORMAT parquet, COMPRESSION zstd)")
                rep = self.reports[name]
                rep.written = self._scalar(f"SELECT count(*) FROM {self.final[name]}")
                rep.lake_path = str(target)

    # --- helpers

    def _lake_exists(self, name: str) -> bool:
        d = lake.table_dir(self.settings, name)
        return d.is_dir() and any(d.glob("month=*/*.parquet" if name == TRANSACTIONS.name else "*.parquet"))

    def _lake_sql(self, name: str) -> str:
        cols = ", ".join(_quote(c.name) for c in _TABLES[name].columns)
        return (f"(SELECT {cols} FROM read_parquet('{_sql_glob(lake.table_glob(self.settings, name))}', "
                "union_by_name = true, hive_partitioning = false))")

    def _scalar(self, sql: str) -> int:
        row = self.con.execute(sql).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


_DUCK = {"string": "VARCHAR", "timestamp": "TIMESTAMPTZ", "float": "DOUBLE", "int": "BIGINT",
         "bool": "BOOLEAN"}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


def _sql_glob(g: str) -> str:
    return g.replace("'", "''")


# --- reading files ---------------------------------------------------------------------------------------


class _Reader:
    """One source file: file-level checks, then its rows as raw frames, chunk by chunk."""

    def __init__(self, path: Path, tm: TableMapping, table: str, extra: dict[str, str]) -> None:
        self.path, self.tm, self.table = path, tm, table
        if path.stat().st_size == 0:
            raise IngestError(f"{table} file {path} is empty (0 bytes)")
        self.encoding = self._encoding() if tm.format != "parquet" else None
        self.columns = self._columns()
        read = list(tm.source_columns())
        required = list(tm.required_source_columns())
        for expr in extra.values():
            cols = parse_expression(expr)[1]
            read += cols
            required += cols
        missing = [c for c in dict.fromkeys(required) if c not in self.columns]
        if missing:
            raise IngestError(f"{table} file {path} lacks column(s) {', '.join(missing)} that the mapping "
                              f"reads; it has {', '.join(self.columns) or 'no columns'}")
        known = set(read) | set(tm.ignore)
        unknown = [c for c in self.columns if c not in known]
        if unknown:
            raise IngestError(f"{table} file {path} has column(s) {', '.join(unknown)} that the mapping "
                              f"neither reads nor ignores; map them or add them to tables.{table}.ignore")
        self.present = set(self.columns)
        # header line = line 1; parquet rows are numbered from 1
        self.first_line = 2 if (tm.format != "parquet" and tm.csv.header) else 1

    def _encoding(self) -> str:
        enc = self.tm.csv.encoding
        if enc == "auto":
            from charset_normalizer import from_path

            matches = from_path(self.path)
            best = matches.best()
            if best is None:
                raise IngestError(f"{self.table} file {self.path}: could not detect its encoding; declare "
                                  f"tables.{self.table}.csv.encoding")
            # candidates that fit equally well are usually a Western file read as Central European
            # (e with grave as c with caron): prefer the common encodings among the ties
            ties = [m.encoding for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
            enc = next((e for e in _COMMON_ENCODINGS if e in ties), best.encoding)
            log.info("detected encoding %s for %s", enc, self.path)
        declared = enc
        if codecs.lookup(enc).name == "utf-8":
            enc = "utf-8-sig"  # the same, skipping a byte-order mark
        _check_decodes(self.path, enc, declared, self.table)
        return enc

    def _csv_kwargs(self) -> dict[str, Any]:
        o = self.tm.csv
        kw: dict[str, Any] = {"dtype": str, "keep_default_na": False, "na_filter": False,
                              "skip_blank_lines": False, "encoding": self.encoding}
        if self.tm.format == "whitespace":
            kw["sep"] = r"\s+"
        else:
            kw["sep"] = o.delimiter
            kw["quotechar"] = o.quotechar
        if o.header:
            kw["header"] = 0
        else:
            kw["header"] = None
            kw["names"] = list(o.names or ())
        return kw

    def _columns(self) -> list[str]:
        if self.tm.format == "parquet":
            try:
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            except (pa.ArrowException, OSError) as e:
                raise IngestError(
                    f"{self.table} file {self.path} is not a readable parquet file: {e}") from None
        try:
            head = pd.read_csv(self.path, nrows=0, **self._csv_kwargs())
        except pd.errors.EmptyDataError:
            raise IngestError(f"{self.table} file {self.path} is empty (no header line)") from None
        except pd.errors.ParserError as e:
            raise IngestError(f"{self.table} file {self.path} cannot be parsed: {e}") from None
        return [str(c).strip() for c in head.columns]

    def chunks(self) -> Iterator[tuple[int, pd.DataFrame]]:
        """(line number of the chunk's first row, raw frame) for every chunk of the file."""
        if self.tm.format == "parquet":
            pf = pq.ParquetFile(self.path)
            start = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                df = batch.to_pandas(types_mapper=_arrow_strings)
                df.index = pd.RangeIndex(len(df))
                yield self.first_line + start, df
                start += len(df)
            return
        try:
            reader = pd.read_csv(self.path, chunksize=CSV_CHUNK_ROWS, **self._csv_kwargs())
            for df in reader:
                start = int(df.index[0]) if len(df) else 0
                df.columns = [str(c).strip() for c in df.columns]
                df.index = pd.RangeIndex(len(df))
                yield self.first_line + start, df
        except pd.errors.ParserError as e:
            raise IngestError(f"{self.table} file {self.path} cannot be parsed: {e}") from None

    def rows(self, lines: np.ndarray) -> pd.DataFrame:
        """The raw rows at the given line numbers, in that order."""
        want = lines - self.first_line
        parts = []
        for first, df in self.chunks():
            off = first - self.first_line
            sel = want[(want >= off) & (want < off + len(df))] - off
            if len(sel):
                parts.append(df.iloc[sel].assign(_pos=sel + off))
        out = pd.concat(parts, ignore_index=True).set_index("_pos").loc[want]
        return out.reset_index(drop=True)


def _arrow_strings(t: pa.DataType) -> Any:
    """Keep parquet text as Arrow-backed strings: no Python object per value."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pd.StringDtype("pyarrow")
    return None


def _check_decodes(path: Path, encoding: str, declared: str, table: str) -> None:
    """Raise IngestError naming the byte offset and line of the first byte that does not decode."""
    dec = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset, lines = 0, 1
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            buffered = len(dec.getstate()[0])
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                pos = e.start - buffered  # position within this block
                at = offset + pos
                line = lines + block[:max(pos, 0)].count(b"\n")
                bad = (block[pos:pos + 1] if pos >= 0 else b"").hex()
                raise IngestError(f"{table} file {path} is not valid {declared}: byte 0x{bad or '??'} at "
                                  f"offset {at} (line {line}) does not decode; declare the file's encoding "
                                  f"in tables.{table}.csv.encoding (or 'auto' to detect it)") from None
            if not block:
                return
            offset += len(block)
            lines += block.count(b"\n")


def _raw_as_text(raw: pd.DataFrame) -> pd.DataFrame:
    """Source values as text for the rejects file (missing values as empty text)."""
    out = pd.DataFrame(index=range(len(raw)))
    for c in raw.columns:
        s = raw[c]
        if s.dtype == object and all(isinstance(v, str) for v in s.head(1000)):
            out[str(c)] = s.fillna("").to_numpy()
        else:
            out[str(c)] = s.astype(object).where(s.notna(), "").astype(str).to_numpy()
    return out


# --- mapping and normalising one chunk ------------------------------------------------------------------


class _Errors:
    """Per-row first error (kind for counting, reason for the rejects file); the first one found wins.

    A reason is a text, or a function of the row mask giving one text per flagged row, so that messages
    quoting values are only built for the rows that need them."""

    def __init__(self, n: int) -> None:
        self.kind = np.full(n, None, dtype=object)
        self.reason = np.full(n, None, dtype=object)
        self.bad = np.zeros(n, dtype=bool)

    def add(self, mask: np.ndarray | pd.Series, kind: str,
            reason: str | Callable[[np.ndarray], pd.Series | np.ndarray]) -> None:
        m = np.asarray(mask, dtype=bool) & ~self.bad
        if not m.any():
            return
        self.kind[m] = kind
        self.bad |= m
        if callable(reason):
            got = reason(m)
            self.reason[m] = got.to_numpy(dtype=object) if isinstance(got, pd.Series) else np.asarray(got)
        else:
            self.reason[m] = reason


def _quoted(values: pd.Series) -> pd.Series:
    return "'" + values.astype(str) + "'"


def _said(values: pd.Series, before: str, after: str = "") -> Callable[[np.ndarray], pd.Series]:
    """A lazy reason: ``before 'value' after`` for the flagged rows."""
    return lambda m: before + " '" + values[m].astype(str) + "'" + after


def _plain(values: pd.Series, before: str, after: str = "") -> Callable[[np.ndarray], pd.Series]:
    """A lazy reason quoting a number unquoted: ``before value after``."""
    return lambda m: before + " " + values[m].astype(str) + after


class _Normaliser:
    """Maps one raw chunk to the contract's columns and checks every row."""

    def __init__(self, raw: pd.DataFrame, reader: _Reader, table: Table, tm: TableMapping, tz: str,
                 run_end: pd.Timestamp, extra: dict[str, str]) -> None:
        self.raw, self.reader, self.table, self.tm = raw, reader, table, tm
        self.tz, self.run_end = tz, run_end
        self.n = len(raw)
        self.errors = _Errors(self.n)
        self.text_source = tm.format != "parquet"
        self.work = {c: self._clean(raw[c]) for c in raw.columns}
        self.out: dict[str, pd.Series] = {}
        self.extra_specs = extra
        self.extra: dict[str, pd.Series] = {}

    def _clean(self, s: pd.Series) -> pd.Series:
        if s.dtype == object or isinstance(s.dtype, pd.StringDtype):
            if self.text_source:
                s = s.str.strip()
            return s.where(s.notna() & (s != ""))
        return s

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        blank = np.ones(self.n, dtype=bool)
        for s in self.work.values():
            blank &= s.isna().to_numpy()
        self.errors.add(blank, "empty line", "empty line")
        tm = self.tm
        if tm.non_products is not None:
            code = self.work[tm.non_products.column]
            hit = code.isin(tm.non_products.values).to_numpy()
            if tm.non_products.patterns:
                pat = "|".join(f"(?:{p})" for p in tm.non_products.patterns)
                hit |= code.astype("string").str.fullmatch(pat).fillna(False).to_numpy(dtype=bool)
            self.errors.add(hit, NOT_A_PRODUCT, NOT_A_PRODUCT)
        ev = _Evaluator(self)
        for col in self.table.columns:
            spec = tm.columns.get(col.name)
            if spec is None or not all(c in self.reader.present for c in spec.source_columns()):
                values: Any = None
                label = col.name
            elif spec.source is not None:
                values, label = self.work[spec.source], spec.source
            else:
                values, label = ev.eval(spec.expr or ""), f"{col.name} = {spec.expr}"
            values = _broadcast(values, self.n)
            if spec is not None and spec.default is not None:
                values = values.where(values.notna(), spec.default)
            converted = _Convert(self, label).to(col.dtype, values, spec.format if spec else None)
            self.out[col.name] = converted
            if col.required:
                origin = f"column {spec.source}" if spec and spec.source else (
                    f"from {spec.expr}" if spec else "not mapped")
                # parse errors came first, so what is left missing was missing (or empty) in the source
                self.errors.add(converted.isna().to_numpy(), f"missing {col.name}",
                                f"missing {col.name} ({origin})")
        for name, expr in self.extra_specs.items():
            self.extra[name] = _Convert(self, name).to("string", _broadcast(ev.eval(expr), self.n), None)
        self._rules()
        bad = self.errors.bad
        return ~bad, bad.copy()

    def _rules(self) -> None:
        o, e, t = self.out, self.errors, self.table
        day = (self.run_end - pd.Timedelta(days=1)).date()
        for c in t.columns:
            v = o[c.name]
            if c.dtype == "float":
                e.add(np.isinf(v.to_numpy(dtype=float, na_value=np.nan)), f"infinite {c.name}",
                      f"infinite {c.name}")
            elif c.dtype == "timestamp":
                late = (v >= self.run_end).to_numpy(dtype=bool, na_value=False)
                e.add(late, f"{c.name} after the run date",
                      _plain(v, c.name, f" is after the run date {day}"))
        if t.name == TRANSACTIONS.name:
            ret = o[C.IS_RETURN].fillna(False).astype(bool)
            o[C.IS_RETURN] = ret
            o[C.DISCOUNT] = o[C.DISCOUNT].fillna(0.0)
            q, a, d = o[C.QUANTITY], o[C.AMOUNT], o[C.DISCOUNT]
            e.add((q == 0).to_numpy(dtype=bool), "quantity zero", "quantity zero")
            e.add((~ret & (q < 0)).to_numpy(dtype=bool), "negative quantity on a non-return line",
                  _plain(q, "negative quantity", " on a non-return line"))
            e.add((~ret & (a < 0)).to_numpy(dtype=bool), "negative amount on a non-return line",
                  _plain(a, "negative amount", " on a non-return line"))
            e.add((d < 0).to_numpy(dtype=bool), "negative discount", _plain(d, "negative discount"))
            # a return is a negative line whatever sign the source used
            o[C.QUANTITY] = q.where(~ret, -q.abs())
            o[C.AMOUNT] = a.where(~ret, -a.abs())
        elif t.name == MEMBERS.name:
            by = o[C.BIRTH_YEAR]
            odd = ((by < 1900) | (by > self.run_end.year)).to_numpy(dtype=bool, na_value=False)
            e.add(odd, "implausible birth_year", _plain(by, "implausible birth_year"))
        elif t.name == ITEMS.name:
            p = o[C.PRICE]
            e.add((p < 0).to_numpy(dtype=bool), "negative price", _plain(p, "negative price"))
        elif t.name == CAMPAIGNS.name:
            arm = o[C.ARM].str.strip().str.lower()
            o[C.ARM] = arm
            wrong = (arm.notna() & ~arm.isin(ARMS)).to_numpy(dtype=bool)
            e.add(wrong, "arm not treatment/holdout", _said(arm, "arm", f" is not {' or '.join(ARMS)}"))
            cv = o[C.COUPON_VALUE]
            e.add((cv < 0).to_numpy(dtype=bool), "negative coupon_value", _plain(cv, "negative coupon_value"))


def _broadcast(values: Any, n: int) -> pd.Series:
    if isinstance(values, pd.Series):
        return values
    return pd.Series([values] * n if values is not None else [None] * n, dtype=object)


class _Convert:
    """Conversion of mapped values to one contract type, recording unparseable values as row errors."""

    def __init__(self, norm: _Normaliser, label: str) -> None:
        self.norm, self.label = norm, label

    def to(self, dtype: str, values: pd.Series, fmt: str | tuple[str, ...] | None) -> pd.Series:
        return getattr(self, f"_{dtype}")(values, fmt)

    def _string(self, s: pd.Series, fmt: Any) -> pd.Series:
        if pd.api.types.is_float_dtype(s.dtype):
            whole = s.notna() & (s == np.floor(s))
            out = s.astype(object).where(s.notna())
            out[whole] = s[whole].astype("int64").astype(str)
            out[s.notna() & ~whole] = s[s.notna() & ~whole].astype(str)
            return out
        if isinstance(s.dtype, pd.StringDtype):
            return s.where((s != "").fillna(False).to_numpy(dtype=bool))
        if s.dtype != object:
            return s.astype(str).where(s.notna())
        s = s.astype(object).where(s.notna().to_numpy())
        return s.where((s != "").to_numpy())

    def _float(self, s: pd.Series, fmt: Any) -> pd.Series:
        return _number(self.norm, s, self.label)

    def _int(self, s: pd.Series, fmt: Any) -> pd.Series:
        v = _number(self.norm, s, self.label)
        frac = (v.notna() & (v != np.floor(v))).to_numpy(dtype=bool)
        self.norm.errors.add(frac, f"non-integer value in column {self.label}",
                             _said(s, "non-integer value", f" in column {self.label}"))
        return v.where(~frac).round().astype("Int64")

    def _bool(self, s: pd.Series, fmt: Any) -> pd.Series:
        if pd.api.types.is_bool_dtype(s.dtype):
            return s.astype("boolean")
        if pd.api.types.is_numeric_dtype(s.dtype):
            out = s.map({1: True, 0: False}).astype("boolean")
        else:
            low = s.astype("string").str.strip().str.lower()
            out = pd.Series(pd.NA, index=s.index, dtype="boolean")
            out[low.isin(_TRUE).fillna(False).to_numpy(dtype=bool)] = True
            out[low.isin(_FALSE).fillna(False).to_numpy(dtype=bool)] = False
        bad = (s.notna() & out.isna()).to_numpy(dtype=bool)
        self.norm.errors.add(bad, f"unparseable boolean in column {self.label}",
                             _said(s, "unparseable boolean", f" in column {self.label}"))
        return out

    def _timestamp(self, s: pd.Series, fmt: str | tuple[str, ...] | None) -> pd.Series:
        tz = self.norm.tz
        if pd.api.types.is_datetime64_any_dtype(s.dtype):
            out = s if getattr(s.dt, "tz", None) is not None else _localize(s, tz)
            return out.dt.tz_convert("UTC").dt.floor("us").dt.as_unit("us")
        text = s.astype(object).where(s.notna())
        if s.dtype != object:
            text = s.astype(str).where(s.notna())
        out = pd.Series(pd.NaT, index=s.index, dtype="datetime64[us, UTC]")
        todo = text.notna()
        formats = (fmt,) if isinstance(fmt, str) else (fmt or (None,))
        for f in formats:
            if not todo.any():
                break
            part = text[todo]
            if f is None:
                has_offset = part.str.contains(r"(?:Z|[+-]\d\d:?\d\d)$", regex=True).fillna(False)
                got = pd.concat([
                    pd.to_datetime(part[has_offset], format="ISO8601", errors="coerce", utc=True),
                    _localize(pd.to_datetime(part[~has_offset], format="ISO8601", errors="coerce"), tz),
                ]).reindex(part.index)
            else:
                got = pd.to_datetime(part, format=f, errors="coerce", utc="%z" in f)
                if got.dt.tz is None:
                    got = _localize(got, tz)
            got = got.dt.tz_convert("UTC").dt.floor("us").dt.as_unit("us")
            ok = got.notna()
            out[ok[ok].index] = got[ok]
            todo = todo & out.isna()
        bad = todo.to_numpy(dtype=bool)
        if bad.any() and formats != (None,):  # only the failures, few: a valid date beyond pandas' range?
            beyond = np.zeros(len(bad), dtype=bool)
            for i in np.flatnonzero(bad):
                for f in formats:
                    try:
                        datetime.strptime(str(text.iloc[i]), f or "")
                    except ValueError:
                        continue
                    beyond[i] = True
                    break
            self.norm.errors.add(beyond, f"date out of range in column {self.label}",
                                 _said(text, "date",
                                       f" in column {self.label} is outside the years 1678-2261"))
        self.norm.errors.add(bad, f"unparseable date in column {self.label}",
                             _said(text, "unparseable date", f" in column {self.label}"))
        return out


def _localize(s: pd.Series, tz: str) -> pd.Series:
    """Naive local times to tz-aware: an ambiguous time (the repeated hour) is read as standard time, a
    time that does not exist (the skipped hour) is moved forward; neither row is lost."""
    if s.dt.tz is not None:
        return s
    return s.dt.tz_localize(tz, ambiguous=np.zeros(len(s), dtype=bool), nonexistent="shift_forward")


def _number(norm: _Normaliser, s: pd.Series, label: str) -> pd.Series:
    """Values as float64; text that is not a number is a row error naming the value and column."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype(float)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.astype("float64")
    text = s.astype(object).where(s.notna())
    o = norm.tm.csv
    clean = text
    if norm.text_source and (o.thousands or o.decimal != "."):
        clean = text.astype("string")
        if o.thousands:
            clean = clean.str.replace(o.thousands, "", regex=False)
        if o.decimal != ".":
            clean = clean.str.replace(o.decimal, ".", regex=False)
        clean = clean.astype(object).where(clean.notna())
    num = pd.to_numeric(clean, errors="coerce").astype("float64")
    bad = (text.notna() & num.isna()).to_numpy(dtype=bool)
    norm.errors.add(bad, f"unparseable number in column {label}",
                    _said(text, "unparseable number", f" in column {label}"))
    return num


class _Evaluator:
    """Interprets a mapping expression over whole columns (see features.mapping for the language)."""

    def __init__(self, norm: _Normaliser) -> None:
        self.norm = norm

    def eval(self, text: str) -> Any:
        tree, _ = parse_expression(text)
        return self._ev(tree)

    def _col(self, name: str) -> pd.Series:
        return self.norm.work[name]

    def _label(self, node: ast.expr) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "col":
            return str(node.args[0].value)  # type: ignore[attr-defined]
        return ast.unparse(node)

    def _num(self, node: ast.expr) -> Any:
        v = self._ev(node)
        if isinstance(v, pd.Series):
            return _number(self.norm, v, self._label(node))
        if isinstance(v, bool) or v is None:
            return v
        return float(v)

    def _text(self, node: ast.expr) -> Any:
        v = self._ev(node)
        return _as_text(v)

    def _ev(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return self._col(node.id)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp):
            a, b = self._num(node.left), self._num(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            with np.errstate(divide="ignore", invalid="ignore"):
                r = a / b
            return r.replace([np.inf, -np.inf], np.nan) if isinstance(r, pd.Series) else r
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return -self._num(node.operand)
            return ~_as_bool(self._ev(node.operand), self.norm.n)
        if isinstance(node, ast.BoolOp):
            vals = [_as_bool(self._ev(v), self.norm.n) for v in node.values]
            out = vals[0]
            for v in vals[1:]:
                out = (out & v) if isinstance(node.op, ast.And) else (out | v)
            return out
        if isinstance(node, ast.Compare):
            left, right = node.left, node.comparators[0]
            lv, rv = self._ev(left), self._ev(right)
            numeric = any(isinstance(v, int | float) and not isinstance(v, bool) for v in (lv, rv))
            if numeric:
                lv, rv = self._num(left), self._num(right)
            else:
                lv, rv = _as_text(lv), _as_text(rv)
            op = node.ops[0]
            res = {ast.Eq: lambda: lv == rv, ast.NotEq: lambda: lv != rv, ast.Lt: lambda: lv < rv,
                   ast.LtE: lambda: lv <= rv, ast.Gt: lambda: lv > rv, ast.GtE: lambda: lv >= rv}[type(op)]()
            return _as_bool(res, self.norm.n)
        if isinstance(node, ast.Call):
            return self._call(node.func.id, node.args)  # type: ignore[attr-defined]
        raise AssertionError(f"unexpected node {ast.dump(node)}")  # parse_expression rejects it first

    def _call(self, fn: str, args: list[ast.expr]) -> Any:
        n = self.norm.n
        if fn == "col":
            return self._col(args[0].value)  # type: ignore[attr-defined]
        if fn == "concat":
            parts = [_broadcast(self._text(a), n).astype("string") for a in args]
            out = parts[0]
            for p in parts[1:]:
                out = out + p
            return out
        if fn in ("startswith", "endswith"):
            x = _broadcast(self._text(args[0]), n).astype("string")
            arg = self._ev(args[1])
            r = x.str.startswith(str(arg)) if fn == "startswith" else x.str.endswith(str(arg))
            return r.fillna(False).astype(bool)
        if fn in ("upper", "lower", "strip"):
            x = _broadcast(self._text(args[0]), n).astype("string")
            return getattr(x.str, fn)()
        if fn == "replace":
            x = _broadcast(self._text(args[0]), n).astype("string")
            return x.str.replace(str(self._ev(args[1])), str(self._ev(args[2])), regex=False)
        if fn == "last_word":
            x = _broadcast(self._text(args[0]), n).astype("string").str.strip()
            return x.str.rsplit(n=1).str[-1].astype("string")
        if fn == "int_id":
            v = _broadcast(self._ev(args[0]), n)
            label = self._label(args[0])
            if pd.api.types.is_numeric_dtype(v.dtype):
                ok = v.isna() | (v == np.floor(v))
                text = v.astype(object).where(v.notna())
                text[v.notna() & ok] = v[v.notna() & ok].astype("int64").astype(str)
            else:
                t = v.astype("string").str.strip()
                ok = (t.isna() | t.str.fullmatch(r"[+-]?\d+(?:\.0*)?")).fillna(False)
                text = t.str.replace(r"\.0*$", "", regex=True).str.lstrip("+")
            bad = (~ok).to_numpy(dtype=bool)
            self.norm.errors.add(bad, f"not an integer id in column {label}",
                                 _said(v, "not an integer id", f" in column {label}"))
            return text.where(ok)
        if fn == "abs":
            return abs(self._num(args[0]))
        if fn == "coalesce":
            vals = [self._ev(a) for a in args]
            out = _broadcast(vals[0], n)
            for v in vals[1:]:
                out = out.where(out.notna(), _broadcast(v, n))
            return out
        if fn == "if_else":
            cond = _as_bool(self._ev(args[0]), n)
            a, b = _broadcast(self._ev(args[1]), n), _broadcast(self._ev(args[2]), n)
            return a.where(cond.to_numpy(dtype=bool), b)
        raise AssertionError(fn)


def _as_text(v: Any) -> Any:
    if isinstance(v, pd.Series):
        return v.astype("string")
    return None if v is None else str(v)


def _as_bool(v: Any, n: int) -> pd.Series:
    if isinstance(v, pd.Series):
        if pd.api.types.is_bool_dtype(v.dtype) and not isinstance(v.dtype, pd.BooleanDtype):
            return v
        return v.astype("boolean").fillna(False).astype(bool)
    return pd.Series(np.full(n, bool(v)))


def _arrow_array(s: pd.Series, dtype: str) -> pa.Array:
    if dtype == "timestamp":
        if s.dtype == object:
            s = pd.to_datetime(s, utc=True)
        return pa.array(s.dt.tz_convert("UTC").dt.as_unit("us"), type=_ARROW["timestamp"])
    if dtype == "string":
        if isinstance(s.dtype, pd.StringDtype):
            return pa.array(s.array, type=pa.string(), from_pandas=True)
        return pa.array(s.astype(object), type=pa.string(), from_pandas=True)
    if dtype == "float":
        return pa.array(s.astype("float64"), type=pa.float64(), from_pandas=True)
    if dtype == "int":
        return pa.array(s.astype("Int64"), type=pa.int64())
    return pa.array(s.astype("boolean"), type=pa.bool_())


__all__ = ["IngestError", "IngestReport", "TableReport", "ingest", "sources_from_dir"]
