"""Where each table and feature snapshot lives on disk, and atomic writes.

Layout under ``settings.dirs``::

    lake/transactions/month=YYYY-MM/part-0.parquet   hive-partitioned by the month of ts
    lake/members/part-0.parquet
    lake/items/part-0.parquet
    lake/campaigns/part-0.parquet
    features/<view>/as_of=YYYY-MM-DD/part-0.parquet   one snapshot per as-of date
    rejects/<table>-<run id>.csv

Timestamps are written as ``timestamp[us, tz=UTC]`` (DuckDB and Feast both read that without casts).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import date
from pathlib import Path

from features.settings import Settings

PART = "part-0.parquet"

MEMBER_VIEW = "member_features"
MEMBER_CATEGORY_VIEW = "member_category_features"
ITEM_VIEW = "item_features"
FEATURE_VIEWS = (MEMBER_VIEW, MEMBER_CATEGORY_VIEW, ITEM_VIEW)


def table_dir(settings: Settings, table: str) -> Path:
    return settings.dirs.lake / table


def table_glob(settings: Settings, table: str) -> str:
    """A glob DuckDB's read_parquet takes for every file of ``table``."""
    if table == "transactions":
        return str(table_dir(settings, table) / "month=*" / "*.parquet")
    return str(table_dir(settings, table) / "*.parquet")


def snapshot_dir(settings: Settings, view: str) -> Path:
    return settings.dirs.features / view


def snapshot_path(settings: Settings, view: str, as_of: str) -> Path:
    """The file of one snapshot; ``as_of`` is an ISO date (YYYY-MM-DD)."""
    return snapshot_dir(settings, view) / f"as_of={as_of}" / PART


def snapshot_dates(settings: Settings, view: str = MEMBER_VIEW) -> list[date]:
    """The as-of dates that have a written snapshot of ``view``, oldest first."""
    root = snapshot_dir(settings, view)
    return sorted(date.fromisoformat(m.group(1)) for p in root.glob("as_of=*")
                  if (m := re.fullmatch(r"as_of=(\d{4}-\d\d-\d\d)", p.name)) and any(p.glob("*.parquet")))


def snapshot_glob(settings: Settings, view: str) -> str:
    return str(snapshot_dir(settings, view) / "as_of=*" / "*.parquet")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename.

    Works for a file or a whole directory. On error the temporary is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if tmp.is_dir() and target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def connect_duckdb(database: str | Path = ":memory:", threads: int | None = None):  # -> DuckDBPyConnection
    """A DuckDB connection for library code: no progress bar (it needs ipywidgets inside Jupyter and
    writes to the terminal otherwise), and an optional thread cap."""
    import duckdb

    con = duckdb.connect(str(database), config={"threads": threads} if threads else {})
    # Inside Jupyter without ipywidgets DuckDB refuses the setting; it is only cosmetic there.
    with suppress(duckdb.InvalidInputException):
        con.execute("SET enable_progress_bar = false")
    return con
