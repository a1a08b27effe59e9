"""Model workloads behind ``repurchase train``, ``backtest`` and ``models``: orchestration only.

``train`` backtests a model at the latest cutoff whose labels are observed, logs the run (parameters,
tuning trials as nested runs, metrics beside the baselines', plots, lineage) and registers the version
as ``challenger``; ``promote`` lets it become ``champion`` only through the gate. ``backtest`` does the
same measurement at a chosen cutoff and logs an unregistered run; with ``data`` it first ingests a file
into a temporary workspace (its own lake, features, Feast store and MLflow store), so one command
evaluates any retailer's export.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

from features.settings import MlflowSettings, Settings
from training.backtest import KINDS, BacktestResult, latest_cutoff, run_backtest

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

KIND_NAMES = {"churn": "churn", "next-purchase": "next_purchase", "value": "value"}
"""CLI spelling -> model kind (and registered model name)."""


def _noop(_msg: str) -> None:
    return None


def kind_of(name: str) -> str:
    """The model kind for a CLI name (``next-purchase`` or ``next_purchase``), or a clear error."""
    kind = KIND_NAMES.get(name, name)
    if kind not in KINDS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(KIND_NAMES)}")
    return kind


def registry_name(name: str) -> str:
    """The registered model for a CLI name: a model kind, or ``recommend``."""
    return "recommend" if name == "recommend" else kind_of(name)


def _log_backtest(settings: Settings, result: BacktestResult, register: bool) -> dict[str, Any]:
    from training.tracking import log_model_run

    extra = {"horizon_days": result.horizon_days}
    if result.tuning is not None:
        extra |= {"tuning.trials": result.tuning.trials, "tuning.best_loss": round(result.tuning.best_loss, 6),
                  "tuning.default_loss": round(result.tuning.default_loss, 6),
                  "tuning.seconds": round(result.tuning.seconds, 1)}
    run = log_model_run(settings, result.kind, result.models, result.train_frame, result.test_frame,
                        result.metrics, figures=result.figures, extra_params=extra,
                        extra_tags={"purpose": "train" if register else "backtest"}, register=register)
    return {"run_id": run.run_id, "version": run.version}


def train_model(settings: Settings, kind: str, cutoff: date | None = None, horizon_days: int | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
    """Backtest ``kind`` at ``cutoff`` (default: the latest observable one), log it and register the version
    as challenger. Returns the summary the CLI prints."""
    import mlflow

    from training.backtest import effective_settings
    from training.tracking import _experiment_id, client

    progress = progress or _noop
    kind = kind_of(kind)
    s = effective_settings(settings, kind, horizon_days)
    cut = cutoff or latest_cutoff(s, kind)
    mlflow.set_tracking_uri(s.tracking_uri)
    exp = _experiment_id(s, client(s))
    t0 = time.perf_counter()
    with mlflow.start_run(experiment_id=exp, run_name=f"train-{kind}-{cut}"):
        mlflow.set_tags({"purpose": "train", "model_kind": kind})
        result = run_backtest(s, kind, cut, tune_params=True, log_trials=True, progress=progress)
        logged = _log_backtest(s, result, register=True)
    summary = result.summary()
    summary.update(registered_model=kind, **logged, seconds_total=round(time.perf_counter() - t0, 1))
    return summary


def train_all(settings: Settings, cutoff: date | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """:func:`train_model` for every model kind, reading the lake and building labels once for all."""
    from training.dataset import lake_session

    with lake_session():
        return {kind: train_model(settings, kind, cutoff, progress=progress) for kind in KINDS}


def backtest(settings: Settings, kind: str, cutoff: date, horizon_days: int | None = None,
             tune_params: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    """Backtest ``kind`` at ``cutoff`` on the workspace of ``settings`` and log an unregistered run."""
    import mlflow

    from training.tracking import _experiment_id, client

    kind = kind_of(kind)
    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = _experiment_id(settings, client(settings))
    with mlflow.start_run(experiment_id=exp, run_name=f"backtest-{kind}-{cutoff}"):
        mlflow.set_tags({"purpose": "backtest", "model_kind": kind})
        result = run_backtest(settings, kind, cutoff, horizon_days, tune_params=tune_params, log_trials=True,
                              progress=progress)
        logged = _log_backtest(result.settings, result, register=False)
    return {**result.summary(), **logged}


@contextlib.contextmanager
def ingested_workspace(settings: Settings, data: list[Path], mapping: str | Path,
                       progress: Progress | None = None) -> Iterator[tuple[Settings, dict[str, Any]]]:
    """A temporary workspace (its own lake, features, Feast store and MLflow store) holding ``data``
    ingested through ``mapping``: yields its settings and the ingest counts (read / accepted / rejected per
    table); everything is removed on exit."""
    from features.ingest import ingest, sources_from_dir

    progress = progress or _noop
    with tempfile.TemporaryDirectory(prefix="repurchase-backtest-") as tmp:
        home = Path(tmp) / "home"
        paths = settings.paths.model_copy(update={"home": home})
        mlflow_settings = MlflowSettings(tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}",
                                         artifact_root=Path(tmp) / "artifacts", experiment="backtest")
        s = settings.model_copy(update={"paths": paths, "mlflow": mlflow_settings, "profile": "embedded"})
        s.__dict__.pop("dirs", None)  # a cached_property of the copied settings
        progress(f"ingesting {', '.join(map(str, data))} through mapping {mapping}")
        if len(data) == 1 and Path(data[0]).is_dir():
            sources = sources_from_dir(data[0], mapping)
        else:
            sources = {"transactions": [Path(d) for d in data]}
        report = ingest(sources, mapping, s, mode="replace")
        if not report.reconciles:
            raise RuntimeError(f"ingest counts do not reconcile: {report.to_dict()}")
        counts = {name: {k: t[k] for k in ("read", "accepted", "rejected")}
                  for name, t in report.to_dict()["tables"].items()}
        yield s, counts


def backtest_file(settings: Settings, kind: str, cutoff: date, data: list[Path], mapping: str | Path,
                  horizon_days: int | None = None, tune_params: bool = True,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Ingest ``data`` through ``mapping`` into a temporary workspace, build the features the backtest
    needs, register them in a temporary Feast store and backtest there; nothing outside the temporary
    folder is written. The ingest counts come back under ``ingest``."""
    from features.store import apply
    from training.backtest import effective_settings, ensure_snapshots, training_cutoffs

    progress = progress or _noop
    kind = kind_of(kind)
    with ingested_workspace(settings, data, mapping, progress) as (s, counts):
        eff = effective_settings(s, kind, horizon_days)
        progress("computing the feature snapshots of the backtest")
        ensure_snapshots(eff, [*training_cutoffs(eff, kind, cutoff), cutoff])
        apply(s)
        out = backtest(s, kind, cutoff, horizon_days, tune_params=tune_params, progress=progress)
    out["ingest"] = counts
    return out
