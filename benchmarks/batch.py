"""Benchmark: ``repurchase score`` and ``repurchase run-daily`` for 1M members (issue 6).

    uv run python benchmarks/batch.py --members 1000000 [--json]

Workspace, made once under ``--workdir`` (default /tmp/bench-batch) and reused: the demo data of
``--members`` members, ingested, with the snapshots the backtests need and the Feast registry
(``benchmarks.scoring.prepare_workspace``, in a child process); then, as a user would, ``repurchase train
all`` (tuning off: the benchmark times scoring, not tuning; the models keep the settings' tree bound) and
``repurchase models promote`` of the four models, with MLflow on a SQLite file beside the workspace.

Measured, each in a child process (``python -m pipelines.cli ...``: the commands as shipped), wall clock
and the child's peak RSS:

- ``repurchase score``: every member of the latest snapshot by the champions (features through Feast's
  offline store, churn with reasons, next purchase, value, the recommender's top
  ``serving.precomputed_recommendations``), written and logged to MLflow; the manifest's seconds per step;
- reference for it, in the same run and process kind: the floor of the same work, the raw boosters
  (``Booster.predict``, one thread, both stages of the hazard) on the snapshot's rows read from parquet,
  and implicit's plain ``als.recommend(all members, N=10, filter_already_liked_items=True)`` on the served
  ALS model (``floor``);
- ``repurchase run-daily`` for the day after the last transaction: features, Feast apply, online store,
  score, the daily lists, the dashboard; the run manifest's seconds per step; the reference beside it is
  the step it cannot do without, the feature computation of the same date (``features.compute``, all views).

Goals (issue): score within 3 minutes, run-daily within 5 minutes, for 1M members (~20M lines). Writes
benchmarks/results/batch.json; ``--json`` prints the result as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first, always: this folder's serving.py would hide the serving package

from benchmarks.scoring import machine, say, write_result  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "batch.json"
WORKDIR = Path("/tmp/bench-batch")
READY = ".batch-ready"
GOALS_S = {"score": 180.0, "run_daily": 300.0}
CLI = [sys.executable, "-m", "pipelines.cli"]


def env_for(home: Path) -> dict[str, str]:
    """The commands' environment: the workspace, MLflow beside it, tuning off."""
    return {**os.environ, "REPURCHASE_HOME": str(home),
            "REPURCHASE__MLFLOW__TRACKING_URI": f"sqlite:///{home.parent / (home.name + '-mlflow.db')}",
            "REPURCHASE__MLFLOW__ARTIFACT_ROOT": str(home.parent / (home.name + "-artifacts")),
            "REPURCHASE__TRAINING__TUNING__TRIALS": "0", "REPURCHASE__RECOMMEND__TRIALS": "0"}


def child(args: list[str], home: Path, *, quiet: bool = True, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in the workspace's environment; wall seconds and the child's peak RSS (None
    when it was below an earlier child's: RUSAGE_CHILDREN keeps the largest)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    proc = subprocess.run([*args], env={**env_for(home), **(extra or {})}, cwd=ROOT,
                          stdout=subprocess.PIPE if quiet else None, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[2:])} failed with exit {proc.returncode}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(max(peak, before) / 1024) if peak > before else None,
            "stdout": proc.stdout}


def prepare(home: Path, members: int) -> dict[str, Any]:
    """The workspace (see the module doc); reused when ready."""
    if (home / READY).exists():
        return {**json.loads((home / READY).read_text()), "reused": True}
    from benchmarks.retrain import prepare as prepare_lake

    t = time.perf_counter()
    info: dict[str, Any] = {"lake": prepare_lake(home, members), "steps": {}}
    for step in (["train", "all"], *[["models", "promote", m] for m in ("churn", "next-purchase", "value",
                                                                        "recommend")]):
        say(f"workspace: repurchase {' '.join(step)}")
        r = child([*CLI, *step], home)
        info["steps"][" ".join(step)] = {k: r[k] for k in ("wall_s", "peak_rss_mb")}
    info["wall_s"] = round(time.perf_counter() - t, 1)
    (home / READY).write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


def floor(home: Path) -> dict[str, Any]:
    """The reference of ``score`` (in a child process): raw boosters and implicit's plain top-10."""
    import numpy as np
    import pandas as pd

    from benchmarks.scoring import hazard_floor
    from features.contract import C
    from features.definitions import view_schema
    from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
    from features.settings import load_settings
    from serving.champions import load_champions

    settings = load_settings(environ={k: v for k, v in env_for(home).items() if k.startswith("REPURCHASE")})
    champions = load_champions(settings, {C.MEMBER_ID, *view_schema(settings, MEMBER_VIEW)})
    as_of = snapshot_dates(settings, MEMBER_VIEW)[-1]
    out: dict[str, float] = {}
    t0 = t = time.perf_counter()
    frame = pd.read_parquet(snapshot_path(settings, MEMBER_VIEW, as_of.isoformat()))
    out["read"] = time.perf_counter() - t
    x_churn, x_value = champions.churn._array(frame), champions.value._array(frame)
    t = time.perf_counter()
    for m, x in ((champions.churn, x_churn), (champions.value, x_value)):
        m.booster.predict(x, num_iteration=m.best_iteration, num_threads=1)
    out["churn_value"] = time.perf_counter() - t
    np_floor = hazard_floor(champions.next_purchase, frame)
    t = time.perf_counter()
    np_floor()
    out["next_purchase"] = time.perf_counter() - t
    rec = champions.recommender
    user_items = rec.history.confidence(rec.params["weighting"])
    t = time.perf_counter()
    rec.als.recommend(np.arange(user_items.shape[0]), user_items, N=10, filter_already_liked_items=True)
    out["als_top10"] = time.perf_counter() - t
    timed = out["read"] + out["churn_value"] + out["next_purchase"] + out["als_top10"]
    return {"members": len(frame), "seconds": {k: round(v, 1) for k, v in out.items()},
            "wall_s": round(timed, 1), "with_setup_s": round(time.perf_counter() - t0, 1)}


def features_reference(home: Path) -> dict[str, Any]:
    """The reference of ``run-daily`` (in a child process): the feature computation of the run's date by
    ``features.compute`` (DuckDB). Spark's feature rate is ``feature_computation.py --spark``."""
    from datetime import timedelta

    from features import compute
    from features.settings import load_settings
    from pipelines.demo import last_transaction_date

    settings = load_settings(environ={k: v for k, v in env_for(home).items() if k.startswith("REPURCHASE")})
    day = last_transaction_date(settings) + timedelta(days=1)
    t = time.perf_counter()
    tables = compute.compute_views(settings, day)
    return {"as_of": day.isoformat(), "rows": {k: t.num_rows for k, t in tables.items()},
            "wall_s": round(time.perf_counter() - t, 1)}


def _in_child(fn: str, home: Path) -> dict[str, Any]:
    r = child([sys.executable, __file__, "--child", fn, "--home", str(home)], home)
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "peak_rss_mb": r["peak_rss_mb"],
            "process_wall_s": r["wall_s"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--home", type=Path, default=None, help="workspace (default: WORKDIR/home-<members>)")
    parser.add_argument("--prepare-only", action="store_true", help="make the workspace and stop")
    parser.add_argument("--skip", default="", help="comma-separated: score, floor, run_daily, features")
    parser.add_argument("--spark-score", action="store_true", help="also score on local Spark")
    parser.add_argument("--child", choices=("floor", "features"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    home = args.home or args.workdir / f"home-{args.members}"
    if args.child:
        print(json.dumps({"floor": floor, "features": features_reference}[args.child](home)))
        return {}
    home.parent.mkdir(parents=True, exist_ok=True)
    at_start = machine()
    workspace = prepare(home, args.members)
    if args.prepare_only:
        say(f"workspace ready: {home}")
        return workspace
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"benchmark": "batch", "members": args.members, "home": str(home),
                              "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                              "machine": at_start, "workspace": workspace}
    say("repurchase features apply")  # the registry as this code defines it (a workspace may predate a view)
    child([*CLI, "features", "apply", "--json"], home)
    if "score" not in skip:
        say("repurchase score")
        r = child([*CLI, "score", "--json"], home)
        manifest = json.loads(r["stdout"].strip().splitlines()[-1])
        result["score"] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"], "members": manifest["members"],
                           "recommendation_rows": manifest["recommendation_rows"], "seconds": manifest["seconds"],
                           "goal_s": GOALS_S["score"], "goal_met": r["wall_s"] <= GOALS_S["score"]}
    if args.spark_score:
        say("repurchase score on Spark (features.engine: spark)")
        r = child([*CLI, "score", "--json"], home, extra={"REPURCHASE__FEATURES__ENGINE": "spark"})
        manifest = json.loads(r["stdout"].strip().splitlines()[-1])
        result["score_spark"] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                                 "seconds": manifest["seconds"], "master": "local[2]"}
    if "floor" not in skip:
        say("reference: raw boosters and implicit's plain top-10")
        result["score_reference"] = _in_child("floor", home)
    if "run_daily" not in skip:
        say("repurchase run-daily")
        r = child([*CLI, "run-daily", "--json"], home)
        manifest = json.loads(r["stdout"].strip().splitlines()[-1])
        result["run_daily"] = {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                               "steps": {k: v["seconds"] for k, v in manifest["steps"].items()},
                               "goal_s": GOALS_S["run_daily"], "goal_met": r["wall_s"] <= GOALS_S["run_daily"]}
    if "features" not in skip:
        say("reference: the feature computation of the same date")
        result["run_daily_reference"] = _in_child("features", home)
    for a, b in (("score", "score_reference"), ("run_daily", "run_daily_reference")):
        if a in result and b in result:
            result[f"{a}_over_reference"] = round(result[a]["wall_s"] / max(result[b]["wall_s"], 1e-9), 2)
    say(json.dumps({k: result.get(k) for k in ("score", "score_over_reference", "run_daily",
                                               "run_daily_over_reference")}, default=str))
    return write_result(RESULTS, result, args.json)


if __name__ == "__main__":
    main()
