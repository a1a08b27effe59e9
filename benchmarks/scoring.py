"""Benchmark: batch scoring throughput of the churn, value and next-purchase models, one thread.

    uv run python benchmarks/scoring.py --members 200000 [--repeats 3] [--reasons-rows 10000] [--json]

Workspace (``prepare_workspace``, shared with ``benchmarks/retrain.py``): the demo data of ``--members``
members (``pipelines.demo.generate_raw``, seed 7, ``settings.demo.days`` days), ingested with the real
ingest, the latest feature snapshot (all three views), the snapshots the three backtests need
(``training.backtest.latest_cutoff`` / ``training_cutoffs`` / ``ensure_snapshots``, iterated until none is
missing) and ``features.store.apply``. Kept under ``--workdir`` (default /tmp/bench-models/home-<members>)
and reused by later runs (``--home`` points at another one).

Models: each kind fitted as a backtest would fit it (``run_backtest(settings, kind, latest_cutoff,
tune_params=False, with_figures=False)``: default parameters, early stopping on the later validation
cutoff, so the tree counts are the ones a retrain gives before tuning); saved under the workspace and loaded
by later runs (``--refit`` fits again).

Measured on the rows of the latest member snapshot read from its parquet file, each the best of
``--repeats`` (wall clock and process CPU time, which is the cost on one core), ours and the floor
interleaved:

- ``ChurnModel.predict_proba``, ``ValueModel.predict``, ``NextPurchaseModel.predict`` (member level: the
  n x periods hazard, survival, quantiles, reminder) and all three one after the other on the same frame;
- the floor beside each, in the same run: the raw LightGBM ``Booster.predict(matrix, num_iteration=best,
  num_threads=1)`` of the same booster on the same float matrix, built before timing (for next purchase the
  n x periods person-period matrix, in the model's chunks of 32,768 members a call); ours / floor is the
  overhead of the scoring path (pandas -> matrix, calibration, the next-purchase expansion and summaries);
- ``ChurnModel.reasons`` on a ``--reasons-rows`` sample (per-row Python), beside the booster's
  ``pred_contrib`` on the same rows.

Goal (issue): at least 40,000 members per second per core for the three models; judged on the wall-clock
figure of each model and of the three together. Prints a table, writes benchmarks/results/scoring.json;
``--json`` adds the result as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from features.settings import Settings, load_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scoring.json"
WORKDIR = Path(tempfile.gettempdir()) / "bench-models"
MARKER = "bench-workspace.json"
GOAL_MEMBERS_PER_S = 40_000
KINDS = ("churn", "next_purchase", "value")

log = logging.getLogger("benchmarks")


# --- shared with benchmarks/retrain.py ----------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def write_result(path: Path, result: dict[str, Any], print_json: bool) -> dict[str, Any]:
    """Write a benchmark's result to ``path`` (JSON); with ``print_json`` also as the last line printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if print_json:
        print(json.dumps(result, default=str))
    return result


def bench_settings(home: Path, **overrides: Any) -> Settings:
    """Settings rooted at ``home``, ignoring the caller's REPURCHASE_* environment (as tests/conftest.py)."""
    return load_settings(environ={}, paths={"home": str(home)}, **overrides)


def machine() -> dict[str, Any]:
    """The machine, the library versions and the code (git commit, ``-dirty`` with uncommitted changes)."""
    import subprocess

    import lightgbm
    import pandas as pd

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "lightgbm": lightgbm.__version__,
            "pandas": pd.__version__, "numpy": np.__version__, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "code": git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")}


class Sampler(threading.Thread):
    """Peak RSS (psutil: this process, and its children while ``children`` is set: listing them scans /proc,
    which costs CPU) and the 1-minute load average, sampled in a thread; ``phase()`` starts a new phase and
    returns the peak and mean load of the one that ended."""

    def __init__(self, interval_s: float = 0.2, children: bool = False) -> None:
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.children = children
        self.peak = 0
        self._phase_peak = 0
        self._loads: list[float] = []
        self._all_loads: list[float] = []
        self._halt = threading.Event()
        self._last_load = 0.0

    def _rss(self) -> int:
        rss = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True) if self.children else ():
            with contextlib.suppress(Exception):  # a child that just ended
                rss += child.memory_info().rss
        return rss

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = self._rss()
            except Exception:
                rss = 0
            self.peak = max(self.peak, rss)
            self._phase_peak = max(self._phase_peak, rss)
            now = time.monotonic()
            if now - self._last_load >= 5:
                load = os.getloadavg()[0]
                self._loads.append(load)
                self._all_loads.append(load)
                self._last_load = now
            self._halt.wait(self.interval_s)

    def phase(self) -> dict[str, Any]:
        loads = self._loads or [os.getloadavg()[0]]
        out = {"peak_rss_mb": round(max(self._phase_peak, self._rss()) / 2**20),
               "load_mean": round(float(np.mean(loads)), 2), "load_max": round(float(np.max(loads)), 2)}
        self._phase_peak = self._rss()
        self._loads = []
        return out

    def overall(self) -> dict[str, Any]:
        loads = self._all_loads or [os.getloadavg()[0]]
        return {"peak_rss_mb": round(self.peak / 2**20), "load_mean": round(float(np.mean(loads)), 2),
                "load_max": round(float(np.max(loads)), 2)}

    def stop(self) -> None:
        self._halt.set()


def backtest_snapshot_dates(settings: Settings, kinds: tuple[str, ...] = KINDS) -> dict[str, dict[str, Any]]:
    """Per kind, the backtest cutoff ``repurchase train`` picks and its training cutoffs, given the
    snapshots there are now."""
    from training.backtest import effective_settings, latest_cutoff, training_cutoffs

    out = {}
    for kind in kinds:
        s = effective_settings(settings, kind, None)
        cut = latest_cutoff(s, kind)
        out[kind] = {"cutoff": cut, "train_cutoffs": training_cutoffs(s, kind, cut)}
    return out


def _grid_cutoffs(settings: Settings, latest: date, kinds: tuple[str, ...]) -> list[date]:
    """The backtest cutoff of each kind on the weekly snapshot grid ending at ``latest`` (what a workspace
    built with ``features build --history`` would offer ``latest_cutoff``)."""
    from features.compute import default_snapshot_dates
    from training.backtest import label_window_days

    grid = default_snapshot_dates(settings, latest)
    out = set()
    for kind in kinds:
        window = timedelta(days=label_window_days(settings, kind))
        fits = [d for d in grid if d + window <= latest]
        if not fits:
            raise RuntimeError(f"{kind}: no snapshot date leaves a {window.days}-day label window")
        out.add(max(fits))
    return sorted(out)


def prepare_workspace(home: Path, members: int, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """Demo data, lake, the feature snapshots the backtests of ``kinds`` need and the Feast registry under
    ``home``; reused when ``home`` holds a finished one of the same size. Returns what it did and how long
    each step took (seconds)."""
    marker = home / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("members") != members:
            raise SystemExit(f"{home} holds a workspace of {info.get('members')} members, not {members}")
        return {**info, "reused": True}
    from features.ingest import ingest, sources_from_dir
    from features.lake import MEMBER_VIEW, snapshot_dates
    from features.store import apply
    from pipelines.demo import build_features, generate_raw, last_transaction_date
    from training.backtest import ensure_snapshots

    settings = bench_settings(home)
    seconds: dict[str, float] = {}
    info: dict[str, Any] = {"members": members, "home": str(home)}

    t = time.perf_counter()
    say(f"generating demo data for {members:,} members ({settings.demo.days} days)")
    summary = generate_raw(settings, members)
    seconds["generate"] = time.perf_counter() - t
    info.update(lines=summary.lines, orders=summary.orders, days=settings.demo.days)

    t = time.perf_counter()
    say(f"ingesting {summary.lines:,} lines")
    report = ingest(sources_from_dir(settings.dirs.raw / "demo", "demo"), "demo", settings, mode="replace")
    if not report.reconciles:
        raise RuntimeError(f"ingest counts do not reconcile: {report.to_dict()}")
    seconds["ingest"] = time.perf_counter() - t

    t = time.perf_counter()
    say("computing the latest snapshot (all views)")
    latest = last_transaction_date(settings) + timedelta(days=1)
    build_features(settings, [latest])
    seconds["latest_snapshot"] = time.perf_counter() - t

    t = time.perf_counter()
    computed: list[date] = []
    grid = _grid_cutoffs(settings, latest, kinds)
    say(f"computing the backtest cutoffs' snapshots {', '.join(map(str, grid))}")
    computed += ensure_snapshots(settings, grid)
    while True:  # training cutoffs prefer existing snapshots: iterate until the plan stops changing
        plan = backtest_snapshot_dates(settings, kinds)
        wanted = sorted({d for p in plan.values() for d in (p["cutoff"], *p["train_cutoffs"])})
        say(f"computing training snapshots (missing of {', '.join(map(str, wanted))})")
        missing = ensure_snapshots(settings, wanted)
        computed += missing
        if not missing:
            break
    seconds["backtest_snapshots"] = time.perf_counter() - t
    info["snapshots_computed"] = len(computed) + 1
    info["snapshot_dates"] = [d.isoformat() for d in snapshot_dates(settings, MEMBER_VIEW)]
    info["plan"] = {k: {"cutoff": p["cutoff"].isoformat(), "train_cutoffs": [d.isoformat() for d in
                                                                             p["train_cutoffs"]]}
                    for k, p in plan.items()}

    t = time.perf_counter()
    say("applying the Feast definitions")
    apply(settings)
    seconds["feast_apply"] = time.perf_counter() - t
    info["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    info["seconds"]["total"] = round(sum(seconds.values()), 1)
    marker.write_text(json.dumps(info, indent=2))
    return {**info, "reused": False}


# --- scoring --------------------------------------------------------------------------------------------------


def best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Best wall and best CPU seconds of ``repeats`` calls of each of ``fns``, interleaved (one call of each
    per round), so that a change in the machine's load hits them alike."""
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            walls[k].append(time.perf_counter() - w0)
            cpus[k].append(time.process_time() - c0)
    return {k: {"wall_s": min(walls[k]), "cpu_s": min(cpus[k]), "walls_s": [round(w, 4) for w in walls[k]]}
            for k in fns}


def _trees(model: Any) -> int:
    """Trees of a model, both stages of a two-stage hazard."""
    member = getattr(model, "member_booster", None)
    return model.booster.num_trees() + (0 if member is None else member.num_trees())


def fit_models(settings: Settings, home: Path, refit: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The three models: loaded from the workspace, or fitted by a backtest without tuning and saved."""
    from training.backtest import latest_cutoff, run_backtest
    from training.models import load_model

    models, info = {}, {}
    folder = home / "bench-models"
    folder.mkdir(exist_ok=True)
    for kind in KINDS:
        path = folder / f"{kind}.json"
        if path.exists() and not refit:
            models[kind] = load_model(path, settings=settings)
            info[kind] = json.loads((folder / f"{kind}.fit.json").read_text())
            info[kind]["loaded_from"] = str(path)
            continue
        cut = latest_cutoff(settings, kind)
        say(f"fitting {kind} (backtest at {cut}, default parameters, early stopping)")
        t = time.perf_counter()
        result = run_backtest(settings, kind, cut, tune_params=False, with_figures=False)
        model = result.models["model"]
        info[kind] = {"cutoff": cut.isoformat(), "fit_s": round(time.perf_counter() - t, 1),
                      "backtest_seconds": {k: round(v, 1) for k, v in result.seconds.items()},
                      "train_rows": len(result.train_frame), "best_iteration": model.best_iteration,
                      "trees": _trees(model), "features": len(model.features),
                      "params": {k: model.params.get(k) for k in ("learning_rate", "num_leaves")},
                      "headline": result.report().get("model")}
        model.save(path)
        (folder / f"{kind}.fit.json").write_text(json.dumps(info[kind], indent=2))
        models[kind] = model
    return models, info


def _rate(n: int, t: dict[str, float]) -> dict[str, Any]:
    return {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()},
            "per_s": round(n / t["wall_s"]), "per_cpu_s": round(n / max(t["cpu_s"], 1e-9))}


def hazard_floor(nextp: Any, frame: Any) -> Callable[[], np.ndarray]:
    """The raw boosters of ``nextp`` on ``frame``'s person-period rows (matrices built now, not when called):
    the period trees on every person-period row, the member trees once per member (a single-stage model:
    its one booster on every person-period row), in the model's chunks a booster call."""
    from training.next_purchase import _PREDICT_CHUNK

    x_np = nextp._array(frame)
    rec, gap = nextp._recency_gap(frame)
    x_np_rows = nextp._expand_all(x_np, rec, gap)
    periods = len(nextp.bins_days)
    step = _PREDICT_CHUNK * periods  # the person-period rows of one booster call of NextPurchaseModel.hazard
    x_np_member = np.zeros((len(x_np), x_np_rows.shape[1]))  # the member trees' input: period columns at 0
    x_np_member[:, : x_np.shape[1]] = x_np

    def call() -> np.ndarray:
        if nextp.member_booster is None:
            return np.concatenate([nextp.booster.predict(x_np_rows[lo:lo + step], num_iteration=nextp.best_iteration,
                                                         num_threads=1) for lo in range(0, len(x_np_rows), step)])
        period = np.concatenate([nextp.booster.predict(x_np_rows[lo:lo + step], num_iteration=nextp.best_iteration,
                                                       raw_score=True, num_threads=1)
                                 for lo in range(0, len(x_np_rows), step)])
        member = nextp.member_booster.predict(x_np_member, num_iteration=nextp.member_best_iteration,
                                              raw_score=True, num_threads=1)
        return 1.0 / (1.0 + np.exp(-(period.reshape(len(x_np), periods) + member[:, None]).ravel()))

    return call


def measure(models: dict[str, Any], frame: Any, repeats: int, reasons_rows: int) -> dict[str, Any]:
    churn, value, nextp = models["churn"], models["value"], models["next_purchase"]
    n = len(frame)
    # the floors' inputs, built before timing: the same float matrices the models hand their boosters
    x_churn, x_value = churn._array(frame), value._array(frame)
    periods = len(nextp.bins_days)
    floor_np = hazard_floor(nextp, frame)

    def floor(model: Any, x: np.ndarray) -> Callable[[], Any]:
        return lambda: model.booster.predict(x, num_iteration=model.best_iteration, num_threads=1)

    # the model outputs match their floors (the timed paths compute what the floors compute)
    np.testing.assert_allclose(churn.predict_raw(frame), floor(churn, x_churn)(), rtol=1e-12)
    np.testing.assert_allclose(value.predict(frame), np.maximum(floor(value, x_value)(), 0), rtol=1e-12)
    np.testing.assert_allclose(np.clip(nextp.hazard(frame), 0, 1 - 1e-12).ravel(),
                               np.clip(floor_np(), 0, 1 - 1e-12), rtol=1e-9)

    def all_three() -> None:
        churn.predict_proba(frame)
        value.predict(frame)
        nextp.predict(frame)

    floors = {"churn": floor(churn, x_churn), "value": floor(value, x_value),
              "next_purchase": floor_np}

    single_floors = list(floors.values())

    def all_floors() -> None:
        for f in single_floors:
            f()

    ours = {"churn": lambda: churn.predict_proba(frame), "value": lambda: value.predict(frame),
            "next_purchase": lambda: nextp.predict(frame), "all_three": all_three}
    floors["all_three"] = all_floors
    out: dict[str, Any] = {"rows": n, "next_purchase_rows_per_member": periods}
    for what in ("churn", "value", "next_purchase", "all_three"):
        say(f"timing {what} (best of {repeats})")
        t = best_of({"ours": ours[what], "floor": floors[what]}, repeats)
        o, f = _rate(n, t["ours"]), _rate(n, t["floor"])
        out[what] = {"ours": o, "floor": f, "ours_over_floor": round(o["wall_s"] / f["wall_s"], 2),
                     "goal_met": o["per_s"] >= GOAL_MEMBERS_PER_S}

    sample = frame.sample(n=min(reasons_rows, n), random_state=7)
    x_sample = churn._array(sample)
    say(f"timing churn reasons on {len(sample):,} rows (best of {repeats})")
    t = best_of({"ours": lambda: churn.reasons(sample),
                 "floor": lambda: churn.booster.predict(x_sample, num_iteration=churn.best_iteration,
                                                        pred_contrib=True, num_threads=1)}, repeats)
    o, f = _rate(len(sample), t["ours"]), _rate(len(sample), t["floor"])
    out["churn_reasons"] = {"rows": len(sample), "ours": o, "floor": f,
                            "ours_over_floor": round(o["wall_s"] / f["wall_s"], 2)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="workspaces are kept here and reused")
    parser.add_argument("--home", type=Path, default=None, help="workspace (default: WORKDIR/home-<members>)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reasons-rows", type=int, default=10_000)
    parser.add_argument("--refit", action="store_true", help="fit the models again even if saved")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    home = args.home or args.workdir / f"home-{args.members}"
    home.mkdir(parents=True, exist_ok=True)
    started = datetime.now().astimezone()
    load_start = [round(x, 2) for x in os.getloadavg()]
    at_start = machine()  # the code measured is the code at the start (others may commit meanwhile)

    t = time.perf_counter()
    workspace = prepare_workspace(home, args.members)
    prep_s = time.perf_counter() - t
    settings = bench_settings(home)
    models, fits = fit_models(settings, home, args.refit)

    import pandas as pd

    from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path

    as_of = snapshot_dates(settings, MEMBER_VIEW)[-1]
    path = snapshot_path(settings, MEMBER_VIEW, as_of.isoformat())
    t = time.perf_counter()
    frame = pd.read_parquet(path)
    read_s = time.perf_counter() - t
    say(f"scoring {len(frame):,} members of the snapshot as of {as_of}")
    load_before = round(os.getloadavg()[0], 2)
    figures = measure(models, frame, args.repeats, args.reasons_rows)
    load_after = round(os.getloadavg()[0], 2)

    result = {"benchmark": "scoring", "started": started.isoformat(timespec="seconds"),
              "members": args.members, "as_of": as_of.isoformat(), "snapshot": str(path),
              "snapshot_read_s": round(read_s, 2), "repeats": args.repeats,
              "goal_members_per_s_per_core": GOAL_MEMBERS_PER_S,
              "workspace": {k: v for k, v in workspace.items() if k != "snapshot_dates"},
              "workspace_s_this_run": round(prep_s, 1), "models": fits, "figures": figures,
              "load_1m": {"start": load_start[0], "before_timing": load_before, "after_timing": load_after},
              "training_settings": settings.training.model_dump(mode="json"),
              "machine": {**at_start, "load_avg_end": machine()["load_avg"]}}

    header = (f"{'what':<14} {'rows':>8} {'ours s':>8} {'members/s':>10} {'/cpu s':>10} {'floor s':>8} "
              f"{'floor /s':>10} {'ours/floor':>10} {'goal 40k':>8}")
    print()
    print(f"scoring {len(frame):,} members (snapshot {as_of}), one thread, best of {args.repeats}; "
          f"load average {load_before} before, {load_after} after")
    print(header)
    print("-" * len(header))
    for what in ("churn", "value", "next_purchase", "all_three", "churn_reasons"):
        m = figures[what]
        rows = m.get("rows", len(frame))
        goal = ("met" if m["goal_met"] else "NOT met") if "goal_met" in m else "-"
        print(f"{what:<14} {rows:>8} {m['ours']['wall_s']:>8.3f} {m['ours']['per_s']:>10,} "
              f"{m['ours']['per_cpu_s']:>10,} {m['floor']['wall_s']:>8.3f} {m['floor']['per_s']:>10,} "
              f"{m['ours_over_floor']:>10.2f} {goal:>8}")
    print("members/s: rows / best wall s; /cpu s: rows / best process CPU s (one core); floor: raw "
          "Booster.predict(num_threads=1) on the prepared float matrix (next purchase: the n x "
          f"{figures['next_purchase_rows_per_member']} period rows; reasons: pred_contrib)")
    for kind, f in fits.items():
        print(f"{kind} model: best iteration {f['best_iteration']}, {f['trees']} trees, {f['features']} "
              f"features, {f.get('params')}, fitted on {f['train_rows']:,} rows at cutoff {f['cutoff']}"
              + (f" in {f['fit_s']} s" if "fit_s" in f else ""))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {RESULTS}")
    if args.json:
        print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
