"""Benchmark: loading member features into the SQLite online store, Feast materialize vs the bulk writer.

    uv run python benchmarks/online_load.py --members 1000000 [--feast-members 50000]

Writes a random member_features snapshot with the contract's exact schema (random values, ~15% nulls
in floats and strings) under a temporary home, applies the Feast repo, then measures in a child process
each (wall time of ``features.online.load_online`` and peak RSS of the child):

- ``feast``: ``FeatureStore.materialize`` (the reference) at ``--feast-members`` (default 50k: at 1M it
  would take many minutes);
- ``bulk`` at the same size, for the ratio;
- ``bulk`` at ``--members``, alone (no reference at that size: said so in the output);
- with ``--redis-members N``: ``feast`` and ``bulk`` into Redis (production profile: Redis online store,
  SQL registry on PostgreSQL, a throw-away project whose keys are deleted afterwards) at N members.

After each load the online store is read back through Feast's ``get_online_features`` for a sample of
members and the bulk result is compared with the materialized one at the same size. Prints a table and
writes benchmarks/results/online_load.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# the script's own folder holds benchmarks/feature_computation.py, which would shadow the features package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

from features.contract import C, member_feature_schema  # noqa: E402
from features.lake import MEMBER_VIEW, atomic_path, snapshot_path  # noqa: E402
from features.settings import Settings, load_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "online_load.json"
AS_OF = "2024-06-03"
LABELS = np.array(["Champions", "Loyal", "At risk", "Lost", "Potential", "New", "store", "web", "app"],
                  dtype=object)


def _settings(home: Path, store: str = "sqlite") -> Settings:
    if store == "redis":  # production profile: Redis online store, SQL registry on PostgreSQL
        project = "bench_" + "".join(c for c in home.parent.name if c.isalnum()).lower()[-12:] + home.name
        return load_settings(environ={}, paths={"home": str(home)}, profile="production",
                             feast={"project": project})
    return load_settings(environ={}, paths={"home": str(home)})


def write_member_snapshot(settings: Settings, n: int, seed: int = 0) -> Path:
    """A random member_features snapshot of ``n`` members with the contract's schema."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pa.Array] = {
        C.MEMBER_ID: pa.array(np.char.add("M", np.char.zfill(np.arange(n).astype(str), 8)).astype(object)),
        C.AS_OF: pa.array(np.full(n, pd.Timestamp(AS_OF, tz="UTC").value // 1000, dtype=np.int64),
                          pa.timestamp("us", tz="UTC")),
    }
    for name, dtype in member_feature_schema(settings.features.windows_days).items():
        null = rng.random(n) < 0.15
        if dtype == "int":
            cols[name] = pa.array(rng.integers(0, 400, n), pa.int64())
        elif dtype == "float":
            cols[name] = pa.array(np.where(null, np.nan, np.round(rng.gamma(2.0, 30.0, n), 4)), pa.float64())
        elif dtype == "bool":
            cols[name] = pa.array(rng.random(n) < 0.5, pa.bool_())
        else:
            cols[name] = pa.array(LABELS[rng.integers(0, len(LABELS), n)], pa.string(), mask=null)
    target = snapshot_path(settings, MEMBER_VIEW, AS_OF)
    with atomic_path(target) as tmp:
        pq.write_table(pa.table(cols), tmp)
    return target


def _child(home: str, method: str, store: str, queue: mp.Queue) -> None:
    from features.online import load_online
    from features.store import feature_store

    settings = _settings(Path(home), store)
    feature_store(settings)  # import feast and open the registry outside the timing
    report = load_online(settings, MEMBER_VIEW, method=method)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"rows": report.rows, "seconds": report.seconds, "method": report.method,
               "peak_rss_mb": peak_mb})


def measure(home: Path, method: str, store: str = "sqlite") -> dict:
    """Run one load in a fresh child process (spawned, so memory is its own)."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(home), method, store, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{method} load failed in the child (exit code {proc.exitcode})")
    return result


def prepare(home: Path, n: int, store: str = "sqlite") -> None:
    from features.store import apply

    settings = _settings(home, store)
    write_member_snapshot(settings, n)
    apply(settings)


def read_back(home: Path, n: int, sample: int = 2000, store: str = "sqlite") -> pd.DataFrame:
    from features.store import feature_store

    settings = _settings(home, store)
    store = feature_store(settings)
    ids = [f"M{i:08d}" for i in np.linspace(0, n - 1, min(n, sample)).astype(int)]
    response = store.get_online_features(features=store.get_feature_service("serving_v1"),
                                         entity_rows=[{C.MEMBER_ID: m} for m in ids])
    return response.to_df(include_event_timestamps=True)


def same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return list(a.columns) == list(b.columns) and all(
        a[c].astype(object).where(a[c].notna(), None).tolist()
        == b[c].astype(object).where(b[c].notna(), None).tolist() for c in a.columns)


def _cleanup_redis(home: Path) -> None:
    """Delete the benchmark project's Redis keys and registry rows."""
    from features.store import feature_store

    settings = _settings(home, "redis")
    store = feature_store(settings)
    client = store._get_provider().online_store._get_client(store.config.online_store)
    keys = list(client.scan_iter(match=b"*" + settings.feast.project.encode(), count=10_000))
    for i in range(0, len(keys), 10_000):
        client.delete(*keys[i:i + 10_000])
    store.registry.delete_project(settings.feast.project, commit=True)


def compare(scratch: Path, n: int, store: str) -> tuple[list[dict], bool]:
    """feast and bulk at ``n`` members into ``store``; the runs and whether Feast reads them the same."""
    homes = {m: scratch / f"{store}_{m}" for m in ("feast", "bulk")}
    runs = []
    try:
        for method, home in homes.items():
            prepare(home, n, store)
            runs.append({"run": f"{store}: {method} @ {n}", "store": store, "members": n, "requested": method,
                         **measure(home, method, store)})
        equal = same(read_back(homes["feast"], n, store=store), read_back(homes["bulk"], n, store=store))
    finally:
        for home in homes.values():
            if store == "redis" and home.exists():
                _cleanup_redis(home)
            shutil.rmtree(home, ignore_errors=True)
    return runs, equal


def _reachable(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=1_000_000, help="members for the bulk-only run")
    parser.add_argument("--feast-members", type=int, default=50_000,
                        help="members for the feast-vs-bulk comparison (materialize is slow)")
    parser.add_argument("--redis-members", type=int, default=0,
                        help="also compare feast and bulk into Redis (production profile) at this size")
    args = parser.parse_args()
    n_ref = min(args.feast_members, args.members)
    features = len(member_feature_schema())
    scratch = Path(tempfile.mkdtemp(prefix="online_load_"))
    runs: list[dict] = []
    ratios: dict[str, float] = {}
    equal: dict[str, bool] = {}
    full_db_mb = None
    try:
        sqlite_runs, equal["sqlite"] = compare(scratch, n_ref, "sqlite")
        runs += sqlite_runs
        if args.redis_members:
            if _reachable(6379) and _reachable(5432):
                redis_runs, equal["redis"] = compare(scratch, args.redis_members, "redis")
                runs += redis_runs
            else:
                print("Redis or PostgreSQL not reachable: Redis comparison skipped")
        if args.members != n_ref:
            home = scratch / "bulk_full"
            prepare(home, args.members)
            runs.append({"run": f"sqlite: bulk @ {args.members} (no feast reference at this size)",
                         "store": "sqlite", "members": args.members, "requested": None,
                         **measure(home, "bulk")})
            full_db_mb = (home / "feast" / "online_store.db").stat().st_size / 1e6
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for r in runs:
        r["members_per_s"] = r["rows"] / r["seconds"]
        r["feature_rows_per_s"] = r["rows"] * features / r["seconds"]
    for store in equal:
        pair = {r["requested"]: r for r in runs if r["store"] == store and r["requested"]}
        ratios[store] = pair["bulk"]["members_per_s"] / pair["feast"]["members_per_s"]
    out = {
        "benchmark": "online_load", "view": MEMBER_VIEW, "features_per_member": features,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "runs": runs,
        "bulk_vs_feast_speedup_at_same_members": ratios,
        "bulk_reads_equal_feast_reads": equal,
        "full_online_db_mb": full_db_mb,
        "note": f"Feast materialize measured at {n_ref} members (SQLite) only; the bulk run at "
                f"{args.members} has no reference at that size. SQLite stores one row per member and "
                "feature, Redis one hash per member.",
    }
    print(f"{'run':<60} {'members':>9} {'seconds':>9} {'members/s':>10} {'feat rows/s':>11} {'peak MB':>8}")
    for r in runs:
        print(f"{r['run']:<60} {r['members']:>9} {r['seconds']:>9.2f} {r['members_per_s']:>10.0f} "
              f"{r['feature_rows_per_s']:>11.0f} {r['peak_rss_mb']:>8.0f}")
    for store, ratio in ratios.items():
        print(f"{store}: bulk / feast speed at the same size: {ratio:.1f}x; "
              f"reads equal through get_online_features: {equal[store]}")
    print(out["note"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
