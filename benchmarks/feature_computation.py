"""Benchmark: member feature computation for one as-of date, DuckDB (features.compute) vs pandas reference.

    uv run python benchmarks/feature_computation.py --members 1000000 --reference-members 200000

Data (``--data synthetic``, the default): ``features.synthetic.generate_demo_data(raw, members=N, seed=7)``
(realistic: ~20 lines per member), put into a lake either by ``features.ingest.ingest`` (``--lake
ingest``) or, faster, by a plain DuckDB copy of the generator's parquet parts partitioned by month
(``--lake copy``; the generator writes the contract's columns, so the copy is the lake ingest would
write, minus ingest's checks). ``--data random`` uses a quick random lake-shaped generator instead.
Raw files and lakes are kept under ``--workdir`` (default /tmp/bench-features) and reused by later runs.

Each measurement runs in its own child process: DuckDB computing all three views for one as-of date (the
end of the simulated period), and the pandas reference (``benchmarks/reference_pandas.py``) doing the
same at ``--reference-members`` (DuckDB is measured at that size too, so the ratio is like for like).
Wall time, peak RSS of the child (resource.getrusage) and the 1-minute load average before it. Prints a
table, writes benchmarks/results/feature_computation.json.

``--spark`` also measures what ``repurchase features build`` does on each engine at ``--members``:
``features.compute.compute_features`` for the date, writing the three snapshot files, once with
``features.engine: duckdb`` (``duckdb_files``) and once with ``spark`` (``features.spark.write_views``: the
same SQL steps transpiled, on a local Spark session from settings, ``spark.master`` local[2] as shipped;
the executors write part files, the driver streams them into the snapshot files). The JVM's start and the
session are made before the clock starts (a cluster keeps its session); the child's peak RSS is the Python
driver's only, the JVM's memory is not in it. Local mode runs the executors inside the
driver's JVM, so ``--spark-driver-memory`` (8g) is its heap.

(This file is not called ``features.py``: run as a script, its folder comes first on sys.path and a
``features.py`` there would hide the ``features`` package.)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from features.contract import ITEMS, MEMBERS, TRANSACTIONS, C  # noqa: E402
from features.lake import PART, table_dir  # noqa: E402
from features.settings import Settings, load_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "feature_computation.json"
SEED = 7
START = date(2023, 1, 1)


def random_lake_frames(n_members: int, seed: int = 0, days: int = 730, lines_per_member: float = 20.0,
                       n_items: int = 2000, n_categories: int = 40,
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Random transactions, members and items in the contract's columns (quick, vectorised).

    Members join over the period; each has a Poisson number of orders placed after joining; orders have
    1-5 lines of distinct-ish items; ~3% of lines are returned later. Ties in ts happen on purpose.
    """
    rng = np.random.default_rng(seed)
    start = pd.Timestamp(START.isoformat(), tz="UTC")
    items = pd.DataFrame({
        C.ITEM_ID: [f"I{k:05d}" for k in range(n_items)],
        C.CATEGORY: [f"cat{k % n_categories:02d}" for k in range(n_items)],
        C.PRICE: np.round(rng.gamma(2.0, 10.0, n_items), 2),
        C.REPLENISHABLE: (np.arange(n_items) % n_categories) < n_categories // 4,
        C.ITEM_NAME: [f"item {k}" for k in range(n_items)],
    })
    joined_s = rng.integers(-days * 86400, days * 86400, n_members)
    members = pd.DataFrame({
        C.MEMBER_ID: [f"M{k:07d}" for k in range(n_members)],
        C.JOINED_AT: start + pd.to_timedelta(joined_s, unit="s"),
        C.CHANNEL: rng.choice(["store", "web", "app"], n_members),
        C.BIRTH_YEAR: rng.integers(1950, 2005, n_members),
        C.GENDER: rng.choice(["f", "m", None], n_members),
        C.REGION: rng.choice(["north", "south"], n_members),
    })
    mean_lines = 3.0
    n_orders = rng.poisson(lines_per_member / mean_lines * rng.gamma(1.0, 1.0, n_members))
    owner = np.repeat(np.arange(n_members), n_orders)
    lo = np.maximum(joined_s[owner], 0)
    order_s = lo + (rng.random(len(owner)) * (days * 86400 - lo)).astype(np.int64)
    order_s = (order_s // 60) * 60  # minute resolution: same-time orders occur
    n_lines = rng.integers(1, 6, len(owner))
    line_order = np.repeat(np.arange(len(owner)), n_lines)
    item_idx = rng.integers(0, n_items, len(line_order))
    qty = rng.integers(1, 4, len(line_order)).astype(float)
    price = items[C.PRICE].to_numpy()[item_idx]
    discount = np.where(rng.random(len(line_order)) < 0.2, np.round(price * qty * 0.1, 2), 0.0)
    amount = np.round(price * qty - discount, 2)
    ts = start + pd.to_timedelta(order_s[line_order], unit="s")
    order_ids = np.array([f"O{k:09d}" for k in range(len(owner))], dtype=object)
    member_ids = members[C.MEMBER_ID].to_numpy()
    tx = pd.DataFrame({
        C.MEMBER_ID: member_ids[owner[line_order]], C.ORDER_ID: order_ids[line_order],
        C.TS: ts, C.ITEM_ID: items[C.ITEM_ID].to_numpy()[item_idx],
        C.CATEGORY: np.where(rng.random(len(line_order)) < 0.05, None,
                             items[C.CATEGORY].to_numpy()[item_idx]),
        C.QUANTITY: qty, C.AMOUNT: amount, C.DISCOUNT: discount, C.IS_RETURN: False,
    })
    tx = tx.drop_duplicates([C.ORDER_ID, C.ITEM_ID, C.IS_RETURN])
    ret = tx.sample(frac=0.03, random_state=seed).copy()
    ret[C.IS_RETURN] = True
    ret[C.QUANTITY] = -ret[C.QUANTITY]
    ret[C.AMOUNT] = -ret[C.AMOUNT]
    ret[C.DISCOUNT] = 0.0
    ret[C.TS] = ret[C.TS] + pd.to_timedelta(rng.integers(1, 30 * 86400, len(ret)), unit="s")
    tx = pd.concat([tx, ret], ignore_index=True)
    return tx, members, items


_ARROW = {"string": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"), "float": pa.float64(),
          "int": pa.int64(), "bool": pa.bool_()}


def _arrow(frame: pd.DataFrame, table) -> pa.Table:
    cols = [c for c in table.names if c in frame.columns]
    schema = pa.schema([pa.field(c, _ARROW[table.dtype(c)]) for c in cols])
    return pa.Table.from_pandas(frame[cols], schema=schema, preserve_index=False)


def write_lake(settings: Settings, transactions: pd.DataFrame, members: pd.DataFrame,
               items: pd.DataFrame) -> None:
    """Write frames into the lake layout of features.lake (transactions partitioned by month of ts)."""
    for name in ("transactions", "members", "items"):
        shutil.rmtree(table_dir(settings, name), ignore_errors=True)
    for name, frame, table in (("members", members, MEMBERS), ("items", items, ITEMS)):
        table_dir(settings, name).mkdir(parents=True, exist_ok=True)
        pq.write_table(_arrow(frame, table), table_dir(settings, name) / PART)
    tx = _arrow(transactions, TRANSACTIONS)
    tx = tx.append_column("month", pc.strftime(tx.column(C.TS), format="%Y-%m"))
    pq.write_to_dataset(tx, table_dir(settings, "transactions"), partition_cols=["month"],
                        basename_template=PART.replace("0", "{i}"))


def _copy_lake(settings: Settings, raw: Path) -> None:
    """The generator's parquet files -> the lake layout, with DuckDB (transactions partitioned by month)."""
    import duckdb

    for name in ("transactions", "members", "items"):
        shutil.rmtree(table_dir(settings, name), ignore_errors=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for name in ("members", "items"):
        table_dir(settings, name).mkdir(parents=True, exist_ok=True)
        con.execute(f"COPY (SELECT * FROM read_parquet('{raw / (name + '.parquet')}')) "
                    f"TO '{table_dir(settings, name) / PART}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT *, strftime({C.TS}, '%Y-%m') AS month "
                f"FROM read_parquet('{raw / 'transactions' / '*.parquet'}')) "
                f"TO '{table_dir(settings, 'transactions')}' "
                "(FORMAT parquet, PARTITION_BY (month), FILENAME_PATTERN 'part-{i}')")
    con.close()


def _build_lake(members: int, data: str, lake: str, workdir: Path) -> tuple[Path, dict]:
    """A lake of ``members`` members under ``workdir`` (reused when it is there already)."""
    home = workdir / f"home-{data}-{lake}-{members}"
    settings = load_settings(environ={}, paths={"home": str(home)})
    done = home / "lake-complete.json"
    if done.exists():
        return home, json.loads(done.read_text())
    started = time.perf_counter()
    info: dict = {"members": members}
    if data == "synthetic":
        raw = workdir / f"raw-{members}"
        if not (raw / "transactions").is_dir():
            from features.synthetic import generate_demo_data
            generate_demo_data(raw, members=members, seed=SEED)
        info["generate_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        if lake == "ingest":
            from features.ingest import ingest, sources_from_dir
            ingest(sources_from_dir(raw, "demo"), "demo", settings)
        else:
            _copy_lake(settings, raw)
    else:
        write_lake(settings, *random_lake_frames(members, SEED))
    info["lake_s"] = round(time.perf_counter() - started, 1)
    info["lines"] = pq.ParquetDataset(table_dir(settings, "transactions")).read(columns=[C.AMOUNT]).num_rows
    done.write_text(json.dumps(info))
    return home, info


class _StepTimes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.steps: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("as of %s: step"):
            self.steps[record.args[1]] = round(record.args[2], 2)


def _child(kind: str, home: str, as_of: str, queue: mp.Queue, spark_conf: dict | None = None) -> None:
    settings = load_settings(environ={}, paths={"home": home}, spark={"conf": spark_conf or {}},
                             features={"engine": "spark" if kind == "spark" else "duckdb"})
    steps = _StepTimes()
    log = logging.getLogger("features.compute")
    log.setLevel(logging.DEBUG)
    log.addHandler(steps)
    started = time.perf_counter()
    if kind == "duckdb":
        from features.compute import compute_views
        tables = compute_views(settings, as_of)
        rows = {v: t.num_rows for v, t in tables.items()}
    elif kind in ("spark", "duckdb_files"):
        from features.compute import compute_features
        if kind == "spark":
            from features.spark import spark_session
            spark_session(settings)
            started = time.perf_counter()
        written = compute_features(settings, [as_of])
        rows = {v: pq.ParquetFile(paths[0]).metadata.num_rows for v, paths in written.items()}
    else:
        from benchmarks.reference_pandas import read_lake, reference_views
        frames = reference_views(*read_lake(settings), date.fromisoformat(as_of), settings)
        rows = {v: len(f) for v, f in frames.items()}
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put({"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
               "peak_rss_mb": round(usage.ru_maxrss / 1024), "rows": rows, "steps": steps.steps})


def _measure(kind: str, home: Path, as_of: str, spark_conf: dict | None = None) -> dict:
    load = round(os.getloadavg()[0], 2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, str(home), as_of, queue, spark_conf))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"error": f"child exited with {proc.exitcode}", "load_1m": load}
    return {**queue.get(), "load_1m": load, "load_1m_after": round(os.getloadavg()[0], 2)}


def _run_size(members: int, data: str, lake: str, with_reference: bool, workdir: Path,
              spark_conf: dict | None = None) -> dict:
    home, info = _build_lake(members, data, lake, workdir)
    info = {**info, "as_of": (START + timedelta(days=730)).isoformat()}
    info["duckdb"] = _measure("duckdb", home, info["as_of"])
    if spark_conf is not None:
        info["duckdb_files"] = _measure("duckdb_files", home, info["as_of"], spark_conf)
        info["spark"] = _measure("spark", home, info["as_of"], spark_conf)
        info["spark_conf"] = spark_conf
        d, s = info["duckdb_files"], info["spark"]
        if "error" not in d and "error" not in s:
            info["time_ratio_spark_over_duckdb"] = round(s["wall_s"] / d["wall_s"], 2)
            if s["rows"] != d["rows"]:
                info["spark"]["error"] = f"rows differ from DuckDB's: {s['rows']} vs {d['rows']}"
    if with_reference:
        info["pandas"] = _measure("pandas", home, info["as_of"])
        d, p = info["duckdb"], info["pandas"]
        if "error" not in d and "error" not in p:
            info["time_ratio_pandas_over_duckdb"] = round(p["wall_s"] / d["wall_s"], 2)
            info["rss_ratio_pandas_over_duckdb"] = round(p["peak_rss_mb"] / d["peak_rss_mb"], 2)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--reference-members", type=int, default=None,
                        help="run the pandas reference at this size (default: --members; 0: not at all)")
    parser.add_argument("--data", choices=("synthetic", "random"), default="synthetic")
    parser.add_argument("--lake", choices=("ingest", "copy"), default="ingest",
                        help="how synthetic raw files become the lake (see the module docstring)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-features",
                        help="raw files and lakes are kept here and reused")
    parser.add_argument("--spark", action="store_true",
                        help="also compute on local Spark (features.spark) at --members")
    parser.add_argument("--spark-driver-memory", default="8g",
                        help="spark.driver.memory of the local session (local mode runs in the driver)")
    args = parser.parse_args(argv)
    ref_n = args.members if args.reference_members is None else args.reference_members
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    if ref_n and ref_n != args.members:
        runs.append(_run_size(ref_n, args.data, args.lake, True, args.workdir))
    runs.append(_run_size(args.members, args.data, args.lake, ref_n == args.members, args.workdir,
                          {"spark.driver.memory": args.spark_driver_memory} if args.spark else None))
    header = (f"{'members':>9} {'lines':>11} {'engine':>12} {'wall s':>8} {'cpu s':>7} {'peak MB':>8} "
              f"{'x time':>7} {'x RSS':>6} {'load':>5}")
    print(header)
    print("-" * len(header))
    for r in runs:
        for kind in ("duckdb", "pandas", "duckdb_files", "spark"):
            if kind not in r:
                continue
            m = r[kind]
            if "error" in m:
                print(f"{r['members']:>9} {r['lines']:>11} {kind:>12} {m['error']}")
                continue
            tr = 1.0 if kind in ("duckdb", "duckdb_files") else r.get(f"time_ratio_{kind}_over_duckdb", float("nan"))
            mr = 1.0 if kind in ("duckdb", "duckdb_files") else r.get(f"rss_ratio_{kind}_over_duckdb", float("nan"))
            print(f"{r['members']:>9} {r['lines']:>11} {kind:>12} {m['wall_s']:>8.2f} {m['cpu_s']:>7.1f} "
                  f"{m['peak_rss_mb']:>8} {tr:>7.2f} {mr:>6.2f} {m['load_1m']:>5.2f}")
    print("x time / x RSS: pandas reference relative to DuckDB at the same size (DuckDB = 1.00), Spark's "
          "snapshot files relative to DuckDB's (duckdb_files = 1.00); cpu s: "
          "user+system time of the child (2 cores: wall >= cpu / 2); load: 1-minute load average before it")
    for r in runs:
        if r["duckdb"].get("steps"):
            print(f"duckdb step times at {r['members']} members:",
                  ", ".join(f"{k} {v:.1f}s" for k, v in r["duckdb"]["steps"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "feature_computation", "data": args.data, "lake": args.lake,
                                   "runs": runs}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
