"""Benchmark: full retrain of the churn, next-purchase and value models on the demo data, with tuning.

    uv run python benchmarks/retrain.py --members 1000000 --trials 5 [--home DIR] [--json]

(a) Workspace preparation, reported but not part of the retrain figure: demo data, ingest, the feature
snapshots the three backtests need and Feast apply (``benchmarks.scoring.prepare_workspace``), in a child
process; skipped when ``--home`` (default /tmp/bench-models/home-<members>) holds a finished workspace.

(b) The retrain: ``pipelines.models.train_model(settings, kind)`` for churn, next_purchase and value inside
one ``training.dataset.lake_session()``, what ``repurchase train all`` runs for these three (each lake table
read once, labels built once per set of cutoffs): a backtest at the latest observable cutoff with optuna
tuning bounded by ``--trials`` (default 5) and ``--timeout-s`` per model (default
``settings.training.tuning.timeout_s``),
logged to MLflow (nested trial runs, metrics beside the baselines, the pyfunc model) and registered as
challenger, into a SQLite MLflow store under a temporary folder of ``--workdir`` (removed afterwards
unless ``--keep-mlflow``). The figure is the sum of the three calls (imports are timed apart, once).
Every call's own step seconds (snapshots, training sets, tuning, fit, evaluate; MLflow is the rest) are
reported, and a coarse profile: inclusive seconds and calls of the library functions the steps are made of
(wrapped at run time; nothing in the library is changed).

Reference in the same run: a plain fit with the default parameters of each model (``ChurnModel``,
``NextPurchaseModel.member``, ``ValueModel`` with the same settings, so the same row sampling) on the
training frame the retrain built (``result.train_frame`` split at its latest cutoff, as the backtest
splits it): no tuning, no Feast, no baselines, no MLflow, no category model. retrain / reference says what
those add over the bare fits.

Peak RSS (psutil, a sampling thread) and the load average per phase. Rows: entity rows of each training
frame, the rows the final fit trained on after ``settings.training.max_train_rows`` (``--max-train-rows``)
sampled them, and the next-purchase person-period rows. Goal (issue): within 20 minutes at 1M members.

Memory: the training sets and the evaluation read the whole transaction table into pandas (about 10 GB at
1M members, 25M lines) and the per-category next-purchase labels need about as much again on top, which
this 24 GB machine does not have; ``--skip-category-model`` leaves that model out of the next-purchase
retrain (``max_train_rows`` bounds the fits, not this).
Prints a table, writes benchmarks/results/retrain-<members>.json; ``--json`` adds the result as one JSON object on
the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import multiprocessing as mp
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.scoring import (  # noqa: E402
    MARKER,
    WORKDIR,
    Sampler,
    backtest_snapshot_dates,
    bench_settings,
    machine,
    prepare_workspace,
    say,
)

RESULTS_DIR = ROOT / "benchmarks" / "results"
GOAL_S = 20 * 60
KINDS = ("churn", "next_purchase", "value")

# (module, attribute, label): the library functions whose inclusive time the profile reports
PROBES: tuple[tuple[str, str, str], ...] = (
    ("pipelines.models", "latest_cutoff", "latest_cutoff"),
    ("training.backtest", "last_data_day", "last_data_day (backtest)"),
    ("training.backtest", "ensure_snapshots", "ensure_snapshots"),
    ("training.backtest", "read_lake_table", "read_lake_table (backtest: first ts, evaluate)"),
    ("training.backtest", "build_training_set", "build_training_set"),
    ("training.dataset", "read_lake_table", "read_lake_table (training sets)"),
    ("training.dataset", "build_labels", "build_labels"),
    ("training.labels", "build_category_labels", "build_category_labels"),
    ("features.store", "training_frame", "Feast get_historical_features"),
    ("training.dataset", "data_fingerprint", "data_fingerprint (training sets)"),
    ("training.backtest", "tune", "tune"),
    ("training.tuning", "log_trial", "MLflow nested trial runs"),
    ("training.backtest", "_fit_category_model", "category model (set + fit)"),
    ("training.backtest", "_evaluate", "evaluate (model + baselines)"),
    ("training.backtest", "churn_baselines", "churn baselines"),
    ("training.backtest", "next_purchase_baselines", "next-purchase baselines"),
    ("training.backtest", "value_baselines", "value baselines"),
    ("pipelines.models", "_log_backtest", "MLflow log_model_run"),
    ("training.tracking", "data_fingerprint", "data_fingerprint (MLflow)"),
    ("training.models.LgbModel", "_prepare_fit", "model: prepare fit (checks, sampling)"),
    ("training.models.LgbModel", "_matrix", "model: pandas matrix for LightGBM"),
    ("training.next_purchase.NextPurchaseModel", "_person_periods", "model: person-period rows"),
    ("training.models.LgbModel", "_train", "model: lgb.train"),
)


class Probes:
    """Wrap the PROBES functions (module functions or class methods) with timers; ``take()`` returns and
    resets the totals. The wrappers only count; ``restore()`` puts the originals back."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        for target, attr, label in PROBES:
            owner = self._resolve(target)
            original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            self._saved.append((owner, attr, original))
            setattr(owner, attr, self._wrap(original, label))

    @staticmethod
    def _resolve(target: str) -> Any:
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError:
            module, _, cls = target.rpartition(".")
            return getattr(importlib.import_module(module), cls)

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                tot = self.totals.setdefault(label, [0, 0.0])
                tot[0] += 1
                tot[1] += time.perf_counter() - t
        return timed

    def take(self) -> dict[str, dict[str, float]]:
        out = {label: {"calls": int(n), "s": round(s, 2)} for label, (n, s) in self.totals.items()}
        self.totals = {}
        return out

    def restore(self) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


class FitLog(logging.Handler):
    """Keeps the INFO lines of the training modules (fits, tuning trials) and echoes the tuning ones."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.lines.append(msg)
        if record.name == "training.tuning" or "person-period" in msg or "sampled" in msg:
            say(f"  {record.name}: {msg}")

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def _person_period_rows(lines: list[str], service: str) -> dict[str, int] | None:
    """Entity and person-period rows of the last fit of ``service`` logged (the final fit of a backtest)."""
    for line in reversed(lines):
        m = re.match(rf"{service} model: .*?(\d+) entity rows -> (\d+) person-period rows", line)
        if m:
            return {"entity_rows": int(m.group(1)), "person_period_rows": int(m.group(2))}
    return None


def _prepare_child(home: str, members: int, queue: mp.Queue) -> None:
    logging.basicConfig(level=logging.WARNING)
    info = prepare_workspace(Path(home), members)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    extra = {"peak_rss_mb": round(usage.ru_maxrss / 1024), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
    marker = Path(home) / MARKER  # kept with the workspace, for runs that reuse it
    marker.write_text(json.dumps({**json.loads(marker.read_text()), **extra}, indent=2))
    queue.put({**info, **extra})


def prepare(home: Path, members: int) -> dict[str, Any]:
    """(a) in a child process, so that its memory does not stay in the retrain's."""
    if (home / MARKER).exists():
        return prepare_workspace(home, members)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t = time.perf_counter()
    proc = ctx.Process(target=_prepare_child, args=(str(home), members, queue))
    proc.start()
    info = queue.get()  # before join: a full queue would block the child's exit
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"workspace preparation failed (exit {proc.exitcode})")
    return {**info, "wall_s": round(time.perf_counter() - t, 1)}


def _reference_fit(kind: str, settings: Any, train_frame: Any) -> tuple[Any, float]:
    from features.contract import C
    from training.models import ChurnModel, ValueModel
    from training.next_purchase import NextPurchaseModel

    ts = train_frame[C.EVENT_TIMESTAMP]
    train, valid = train_frame[ts < ts.max()], train_frame[ts == ts.max()]
    model = {"churn": lambda: ChurnModel(settings=settings), "value": lambda: ValueModel(settings=settings),
             "next_purchase": lambda: NextPurchaseModel.member(settings)}[kind]()
    t = time.perf_counter()
    model.fit(train, valid)
    return model, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--trials", type=int, default=5, help="optuna trials per model (settings default 20)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="no new trial after this many seconds, per model (default: settings, 600)")
    parser.add_argument("--max-train-rows", type=int, default=None,
                        help="settings.training.max_train_rows: most entity rows per fit (default: settings)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="settings.training.num_threads: LightGBM training threads (default: settings)")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="workspaces and the MLflow folder")
    parser.add_argument("--home", type=Path, default=None, help="workspace (default: WORKDIR/home-<members>)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of the models")
    parser.add_argument("--skip-category-model", action="store_true",
                        help="leave the per-category next-purchase model out of the retrain (its training set "
                             "needs the whole transaction table and its category labels in pandas memory at "
                             "once: about 22 GB at 1M members, more than this machine has)")
    parser.add_argument("--keep-mlflow", action="store_true", help="keep the temporary MLflow store")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for h in logging.getLogger().handlers:
        h.setLevel(logging.WARNING)
    home = args.home or args.workdir / f"home-{args.members}"
    home.mkdir(parents=True, exist_ok=True)
    started = datetime.now().astimezone()
    at_start = machine()  # the code measured is the code at the start (others may commit meanwhile)
    sampler = Sampler()
    sampler.start()
    phases: dict[str, Any] = {}

    # (a) the workspace
    say(f"workspace {home}")
    sampler.children = True  # (a) runs in a child process
    workspace = prepare(home, args.members)
    sampler.children = False
    phases["prepare"] = {"s": workspace.get("wall_s", 0.0), **sampler.phase()}
    if workspace.get("reused"):
        phases["prepare"]["reused"] = True

    # imports, once (a `repurchase train` process pays them too)
    t = time.perf_counter()
    import feast  # noqa: F401
    import lightgbm  # noqa: F401
    import mlflow
    import optuna  # noqa: F401

    import pipelines.models as pm
    import training.backtest
    import training.tracking  # noqa: F401
    phases["imports"] = {"s": round(time.perf_counter() - t, 1), **sampler.phase()}

    tmp = Path(tempfile.mkdtemp(prefix="retrain-mlflow-", dir=args.workdir))
    base = bench_settings(home)
    tuning = {"trials": args.trials, "timeout_s": args.timeout_s or base.training.tuning.timeout_s}
    training_over: dict[str, Any] = {"tuning": tuning}
    if args.max_train_rows:
        training_over["max_train_rows"] = args.max_train_rows
    if args.num_threads is not None:
        training_over["num_threads"] = args.num_threads
    settings = bench_settings(home, mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                                            "artifact_root": str(tmp / "artifacts"), "experiment": "bench"},
                              training=training_over)
    from features.lake import MEMBER_VIEW, snapshot_dates

    plan = backtest_snapshot_dates(settings, kinds)
    n_snapshots = len(snapshot_dates(settings, MEMBER_VIEW))

    captured: dict[str, Any] = {}
    original_run_backtest = pm.run_backtest

    def run_backtest(*a: Any, **k: Any) -> Any:  # keeps the result train_model discards
        result = original_run_backtest(*a, **k)
        captured["result"] = result
        return result

    pm.run_backtest = run_backtest
    import training.backtest as tb

    original_category = tb._fit_category_model
    if args.skip_category_model:
        tb._fit_category_model = lambda *a, **k: None  # run_backtest then fits the member-level model only
    fit_log = FitLog()
    for name in ("training", "pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(fit_log)
    probes = Probes()
    per_kind: dict[str, Any] = {}
    from training.dataset import lake_session

    session = contextlib.ExitStack()  # one lake read and one set of labels per cutoffs, as `train all`
    session.enter_context(lake_session())
    try:
        for kind in kinds:
            say(f"retrain {kind}: train_model (at most {args.trials} trials, {tuning['timeout_s']:.0f} s)")
            sampler.phase()
            probes.take()
            fit_log.take()
            t = time.perf_counter()
            summary = pm.train_model(settings, kind,
                                     progress=lambda m: say(f"  {m}"))
            wall = time.perf_counter() - t
            res = captured.pop("result")
            lines = fit_log.take()
            model = res.models["model"]
            rec: dict[str, Any] = {
                "train_model_s": round(wall, 1), **sampler.phase(),
                "backtest_cutoff": res.cutoff.isoformat(),
                "train_cutoffs": [d.isoformat() for d in res.train_cutoffs],
                "steps_s": {k: round(v, 1) for k, v in res.seconds.items()},
                "outside_backtest_s": round(wall - res.seconds["total"], 1),
                "tuning": ({"trials": res.tuning.trials, "seconds": round(res.tuning.seconds, 1),
                            "best_loss": res.tuning.best_loss, "default_loss": res.tuning.default_loss,
                            "trial_seconds": [round(h["seconds"], 1) for h in res.tuning.history],
                            "best_params": res.tuning.best_params} if res.tuning else None),
                "training_frame_rows": len(res.train_frame), "test_rows": len(res.test_frame),
                "final_fit_train_rows": model.train_rows, "best_iteration": model.best_iteration,
                "metrics": summary["metrics"].get("model"), "registered_version": summary.get("version"),
                "profile": probes.take(),
            }
            if kind == "next_purchase":
                rec["person_periods"] = _person_period_rows(lines, "next_purchase_v1")
                rec["category_model"] = _person_period_rows(lines, "next_purchase_category_v1")
            say(f"retrain {kind}: {wall:.1f} s ({rec['steps_s']}), peak {rec['peak_rss_mb']} MB")

            say(f"reference {kind}: plain fit with default parameters on the same training frame")
            sampler.phase()
            ref_model, ref_s = _reference_fit(kind, res.settings, res.train_frame)
            ref_lines = fit_log.take()
            rec["reference"] = {"fit_s": round(ref_s, 1), **sampler.phase(),
                                "train_rows": ref_model.train_rows, "best_iteration": ref_model.best_iteration,
                                "profile": probes.take()}
            if kind == "next_purchase":
                rec["reference"]["person_periods"] = _person_period_rows(ref_lines, "next_purchase_v1")
            rec["retrain_over_reference"] = round(wall / ref_s, 1)
            say(f"reference {kind}: {ref_s:.1f} s, peak {rec['reference']['peak_rss_mb']} MB")
            per_kind[kind] = rec
            del res, model, ref_model
    finally:
        session.close()
        probes.restore()
        pm.run_backtest = original_run_backtest
        tb._fit_category_model = original_category
        mlflow.end_run()
    snapshots_added = len(snapshot_dates(settings, MEMBER_VIEW)) - n_snapshots
    if not args.keep_mlflow:
        shutil.rmtree(tmp, ignore_errors=True)
    sampler.stop()

    retrain_s = sum(r["train_model_s"] for r in per_kind.values())
    reference_s = sum(r["reference"]["fit_s"] for r in per_kind.values())
    result = {
        "benchmark": "retrain", "started": started.isoformat(timespec="seconds"), "members": args.members,
        "lines": workspace.get("lines"), "kinds": list(kinds),
        "tuning": tuning, "max_train_rows": settings.training.max_train_rows,
        "num_threads": settings.training.num_threads,
        "category_model": "skipped (--skip-category-model)" if args.skip_category_model else "fitted",
        "training_settings": settings.training.model_dump(mode="json"),
        "cutoffs": settings.training.cutoffs, "cutoff_every_days": settings.training.cutoff_every_days,
        "workspace": {k: v for k, v in workspace.items() if k not in ("snapshot_dates",)},
        "plan": {k: {"cutoff": p["cutoff"].isoformat(), "train_cutoffs": [d.isoformat() for d in
                                                                          p["train_cutoffs"]]}
                 for k, p in plan.items()},
        "snapshots_computed_during_retrain": snapshots_added,
        "phases": phases, "models": per_kind,
        "retrain_s": round(retrain_s, 1), "reference_s": round(reference_s, 1),
        "retrain_over_reference": round(retrain_s / reference_s, 1) if reference_s else None,
        "goal_s": GOAL_S, "goal_met": retrain_s <= GOAL_S, "overall": sampler.overall(),
        "mlflow_dir": str(tmp) if args.keep_mlflow else None,
        "machine": {**at_start, "load_avg_end": machine()["load_avg"]},
    }

    print()
    ws = workspace.get("seconds", {})
    print(f"retrain at {args.members:,} members ({workspace.get('lines') or 0:,} lines), {args.trials} trials "
          f"per model (timeout {tuning['timeout_s']:.0f} s), max_train_rows {settings.training.max_train_rows:,}, "
          f"LightGBM training threads {settings.training.num_threads} (0: all cores)")
    print(f"(a) workspace: {'reused, built earlier in' if workspace.get('reused') else 'built in'} "
          + ", ".join(f"{k} {v:.0f}s" for k, v in ws.items())
          + (f"; peak RSS {workspace['peak_rss_mb']} MB" if "peak_rss_mb" in workspace else ""))
    extra = {k: v for k, v in result["training_settings"].items() if k == "max_trees"}
    extra |= {f"tuning.{k}": v for k, v in result["training_settings"]["tuning"].items() if k == "max_rows"}
    if extra:
        print("bounds: " + ", ".join(f"{k} {v:,}" for k, v in extra.items()))
    print(f"code {result['machine']['code']}; imports once: {phases['imports']['s']} s"
          + ("; the per-category next-purchase model is LEFT OUT (--skip-category-model)"
             if args.skip_category_model else ""))
    header = (f"{'model':<14} {'retrain s':>9} {'snap':>5} {'sets':>6} {'tune':>7} {'trials':>6} {'fit':>6} "
              f"{'eval':>6} {'mlflow':>6} {'peak MB':>8} {'ref fit s':>9} {'ref MB':>7} {'ratio':>6} "
              f"{'frame rows':>11} {'fit rows':>10}")
    print(header)
    print("-" * len(header))
    for kind, r in per_kind.items():
        st, trials = r["steps_s"], (r["tuning"] or {}).get("trials", 0)
        print(f"{kind:<14} {r['train_model_s']:>9.1f} {st.get('snapshots', 0):>5.1f} "
              f"{st.get('training_sets', 0):>6.1f} {st.get('tuning', 0):>7.1f} {trials:>6} {st.get('fit', 0):>6.1f} "
              f"{st.get('evaluate', 0):>6.1f} {r['outside_backtest_s']:>6.1f} {r['peak_rss_mb']:>8} "
              f"{r['reference']['fit_s']:>9.1f} {r['reference']['peak_rss_mb']:>7} "
              f"{r['retrain_over_reference']:>6.1f} {r['training_frame_rows']:>11,} {r['final_fit_train_rows']:>10,}")
    print(f"{'total':<14} {retrain_s:>9.1f}  (goal {GOAL_S} s: {'met' if retrain_s <= GOAL_S else 'NOT met'}); "
          f"reference {reference_s:.1f} s; retrain / reference {result['retrain_over_reference']}")
    np_rec = per_kind.get("next_purchase", {})
    if np_rec.get("person_periods"):
        pp = np_rec["person_periods"]
        print(f"next purchase: {pp['entity_rows']:,} entity rows -> {pp['person_period_rows']:,} person-period "
              f"rows in the final fit" + (f"; category model {np_rec['category_model']['entity_rows']:,} -> "
                                          f"{np_rec['category_model']['person_period_rows']:,}"
                                          if np_rec.get("category_model") else ""))
    print("columns: train_model's own step seconds (snap: ensure_snapshots, sets: Feast training sets, tune: "
          "optuna, fit: final fit (+ category model), eval: model + baselines on the backtest cutoff, mlflow: "
          "logging and registering, the rest of train_model); ratio: retrain / reference fit")
    print(f"peak RSS overall {result['overall']['peak_rss_mb']} MB; load average mean "
          f"{result['overall']['load_mean']}, max {result['overall']['load_max']}; snapshots computed during "
          f"the retrain: {snapshots_added}")
    for kind, r in per_kind.items():
        top = sorted(r["profile"].items(), key=lambda kv: -kv[1]["s"])[:10]
        print(f"profile {kind} (inclusive s, calls): " + "; ".join(f"{k} {v['s']:.1f}/{v['calls']}" for k, v in top))
    out = RESULTS_DIR / f"retrain-{args.members}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    if args.json:
        print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
