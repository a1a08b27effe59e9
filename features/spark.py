"""The feature definitions run on Spark: the same SQL steps as DuckDB, transpiled, over the same lake.

``features.compute.feature_steps`` is the one definition of every feature; :func:`compute_views` runs its
Spark translation (``feature_sql(..., dialect="spark")``) on a Spark session whose ``transactions``,
``members`` and ``items`` are the lake's parquet files with the contract's columns and types, and gives
the same tables, in the same order, that DuckDB gives (floats agree to rounding: Spark sums in another
order). With ``features.engine: spark``, ``features.compute.compute_features`` calls :func:`write_views`:
the executors write each view's part files and the driver streams them into the same snapshot files
DuckDB writes, so Feast, training and scoring read them without knowing which engine wrote them, and no
view is collected into the driver's memory.

The session comes from settings (``spark.master``: ``local[N]`` in tests and on one machine, a cluster's URL
such as ``spark://host:7077`` or ``yarn`` otherwise; ``spark.conf`` for anything else). The lake must be
where the executors can read it (a shared file system or an object store URL in ``paths.lake``).

Example::

    tables = compute_views(settings, "2025-12-31")          # {"member_features": pa.Table, ...}, collected
    write_views(settings, "2025-12-31", {"member_features": Path("member_features.parquet")})  # {view: rows}
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.contract import ITEMS, MEMBERS, TRANSACTIONS, DType, Table
from features.lake import FEATURE_VIEWS, atomic_path, table_dir
from features.settings import Settings

log = logging.getLogger(__name__)

_SPARK_TYPES: dict[DType, str] = {"string": "STRING", "timestamp": "TIMESTAMP", "float": "DOUBLE", "int": "BIGINT",
                                  "bool": "BOOLEAN"}
_lock = threading.Lock()


def spark_session(settings: Settings) -> Any:
    """The Spark session of ``settings.spark`` (created once per process; UTC, Arrow transfers on)."""
    from pyspark.sql import SparkSession

    with _lock:
        builder = (SparkSession.builder.master(settings.spark.master).appName(settings.spark.app_name)
                   .config("spark.sql.session.timeZone", "UTC")
                   .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                   .config("spark.sql.shuffle.partitions", str(settings.spark.shuffle_partitions))
                   .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false"))
        for k, v in settings.spark.conf.items():
            builder = builder.config(k, v)
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
        return spark


def _source_view(spark: Any, settings: Settings, table: Table) -> None:
    """``table`` of the lake as a temporary view with the contract's columns and types (absent optional
    columns as typed nulls), as ``features.compute`` sets it up on DuckDB."""
    folder = table_dir(settings, table.name)
    files = sorted(str(p) for p in Path(folder).rglob("*.parquet")) if Path(folder).exists() else []
    if not files:
        raise FileNotFoundError(f"lake table {table.name!r} has no parquet files under {folder}; run ingest first")
    from features.compute import source_columns

    frame = spark.read.option("mergeSchema", "true").parquet(*files)
    cols = source_columns(table, set(frame.columns), _SPARK_TYPES, str(folder), quote="`")
    frame.selectExpr(*cols).createOrReplaceTempView(table.name)


def register_lake(spark: Any, settings: Settings) -> None:
    """The lake's transactions, members and items as temporary views of ``spark``."""
    for table in (TRANSACTIONS, MEMBERS, ITEMS):
        _source_view(spark, settings, table)
    dup = spark.sql(f"SELECT item_id, COUNT(*) AS n FROM {ITEMS.name} GROUP BY item_id HAVING COUNT(*) > 1 "
                    "LIMIT 1").collect()
    if dup:
        raise ValueError(f"lake table 'items' has item_id {dup[0][0]!r} {dup[0][1]} times; item_id must be unique")


def _run_steps(settings: Settings, as_of: date | str, views: Sequence[str], spark: Any,
               result: Callable[[str, Any], None]) -> None:
    """Run the Spark translation of the feature steps; ``result(view, frame)`` gets each view's DataFrame."""
    from features.compute import feature_sql

    register_lake(spark, settings)
    cached: list[Any] = []
    try:
        for step in feature_sql(settings, as_of, "spark", views):
            started = time.perf_counter()
            frame = spark.sql(step.sql)
            if step.name.startswith("_"):
                if step.materialize:  # a DuckDB temp table: computed once, read by the later steps
                    frame = frame.cache()
                    cached.append(frame)
                frame.createOrReplaceTempView(step.name)
            else:
                result(step.name, frame)
            log.debug("spark, as of %s: step %s took %.2f s", as_of, step.name, time.perf_counter() - started)
    finally:
        for frame in cached:
            frame.unpersist()


def compute_views(settings: Settings, as_of: date | str, views: Sequence[str] = FEATURE_VIEWS,
                  spark: Any = None) -> dict[str, pa.Table]:
    """The snapshot tables of ``views`` as of ``as_of`` computed by Spark (see the module docstring),
    collected into the driver: for tests and small sizes; :func:`write_views` is what writes snapshots."""
    from features.compute import _conform, arrow_schema

    out: dict[str, pa.Table] = {}

    def collect(view: str, frame: Any) -> None:
        out[view] = _conform(_utc(frame.toArrow()), arrow_schema(settings, view))

    _run_steps(settings, as_of, views, spark or spark_session(settings), collect)
    return out


def write_views(settings: Settings, as_of: date | str, targets: Mapping[str, Path],
                spark: Any = None) -> dict[str, int]:
    """Compute the views of ``targets`` (view -> snapshot file) on Spark and write each to its file; the
    rows of each view.

    The executors write a view as part files into a folder beside its target (on the cluster's shared
    file system, like the lake); the driver then streams the parts, in Spark's order, row group by row
    group, into the one snapshot file, replaced atomically. No view is ever held whole in the driver."""
    from features.compute import _conform, arrow_schema

    rows: dict[str, int] = {}

    def write(view: str, frame: Any) -> None:
        target = Path(targets[view])
        schema = arrow_schema(settings, view)
        n = 0
        with parts_of(frame, target) as files, atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema) as out:
            for f in files:
                file = pq.ParquetFile(f)
                for i in range(file.num_row_groups):
                    batch = _conform(_utc(file.read_row_group(i)), schema)
                    out.write_table(batch)
                    n += batch.num_rows
        rows[view] = n

    _run_steps(settings, as_of, list(targets), spark or spark_session(settings), write)
    return rows


@contextmanager
def parts_of(frame: Any, beside: Path) -> Iterator[list[Path]]:
    """``frame`` written by the executors as parquet parts into a temporary folder beside ``beside`` (on the
    shared file system the driver reads too): the part files in Spark's order (part-00000 first, so an
    ORDER BY's order), the folder removed afterwards."""
    folder = beside.parent / f".{beside.name}.spark-{uuid.uuid4().hex[:8]}"
    try:
        frame.write.parquet(str(folder))
        yield sorted(folder.glob("part-*.parquet"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _utc(table: pa.Table) -> pa.Table:
    """Spark's rows as Arrow with timestamps as UTC microseconds."""
    cols = []
    for field, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(field.type):
            col = col.cast(pa.timestamp("us", tz="UTC"))
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)
