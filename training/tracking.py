"""MLflow tracking and the promotion gate: runs with lineage, the registry, aliases champion/challenger.

Runs go to ``settings.tracking_uri`` (SQLite under ``mlruns/`` by default) in experiment
``settings.mlflow.experiment``, artifacts under ``settings.mlflow.artifact_root``. Every model run logs the
model's parameters, its backtest metrics and its baselines' on the same rows, plots, the training data's
fingerprint, the FeatureService, the code version, and the model as a pyfunc (with an explicit signature
and pip requirements: inferring them took 3.9 s against 0.11 s, PITFALLS). Registered models are
``churn``, ``next_purchase`` and ``value``. The new version becomes
``challenger``; only :func:`promote` moves ``champion``, and only to a challenger that beats the champion on
the same backtest (same cutoff and data fingerprint). Stages are deprecated: aliases only. Every change of
champion is a registered-model tag ``champion.event.NNNNNN`` (:func:`champion_history`).

Example::

    run = log_churn_run(settings, model, train, backtest)    # registers 'churn', alias challenger
    result = promote(settings, "churn")                      # on PROMOTION_METRIC['churn'] = 'auc'

    print(result.summary())
    rollback(settings, "churn")                              # champion back to the previous one
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from features.contract import C
from features.settings import PROJECT_ROOT, Settings
from training.dataset import data_fingerprint
from training.evaluate import churn_metrics
from training.labels import L
from training.models import ChurnModel, library_versions

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHURN_MODEL = "churn"
NEXT_PURCHASE_MODEL = "next_purchase"
VALUE_MODEL = "value"
RECOMMEND_MODEL = "recommend"
REGISTERED_MODELS = (CHURN_MODEL, NEXT_PURCHASE_MODEL, VALUE_MODEL)
"""The LightGBM models (``recommend`` is registered beside them by :func:`log_recommend_run`)."""
PROMOTION_METRIC = {CHURN_MODEL: "auc", NEXT_PURCHASE_MODEL: "brier_30d", VALUE_MODEL: "rmse",
                    RECOMMEND_MODEL: "recall_at_10"}
"""The backtest metric the promotion gate compares for each registered model."""
PRIMARY_ARTIFACT = "model"
MODEL_METHOD = "model"
CHAMPION = "champion"
CHALLENGER = "challenger"
EVENT_TAG_PREFIX = "champion.event."
LOWER_IS_BETTER = {"log_loss", "brier", "brier_7d", "brier_30d", "mae_days", "rmse", "mae"}


class PromotionError(RuntimeError):
    """The registry is not in a state the promotion gate or a rollback can act on."""


@dataclass(frozen=True)
class ModelRun:
    """What :func:`log_model_run` logged (``version`` is None when the run was not registered)."""

    run_id: str
    version: str | None
    metrics: dict[str, float]
    data_fingerprint: str
    backtest_cutoff: str
    backtest_fingerprint: str


@dataclass(frozen=True)
class Promotion:
    """The promotion gate's comparison and decision."""

    name: str
    metric: str
    challenger: str
    champion: str | None
    challenger_value: float
    champion_value: float | None
    promoted: bool
    reason: str

    def summary(self) -> str:
        champ = (f"champion v{self.champion} {self.metric}={self.champion_value:.4f}"
                 if self.champion is not None and self.champion_value is not None else "no champion")
        verdict = "promoted" if self.promoted else "refused"
        return (f"{self.name}: challenger v{self.challenger} {self.metric}={self.challenger_value:.4f} vs "
                f"{champ}: {verdict} ({self.reason})")


# --- set-up ------------------------------------------------------------------------------------------------


def _artifact_root(settings: Settings) -> Path:
    root = settings.mlflow.artifact_root
    return root if root.is_absolute() else PROJECT_ROOT / root


def client(settings: Settings) -> MlflowClient:
    """An MLflow client on the settings' tracking and registry URI (creating a SQLite file's folder)."""
    from mlflow.tracking import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(settings: Settings, mlc: MlflowClient) -> str:
    exp = mlc.get_experiment_by_name(settings.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    location = (_artifact_root(settings) / settings.mlflow.experiment).resolve()
    location.mkdir(parents=True, exist_ok=True)
    return mlc.create_experiment(settings.mlflow.experiment, artifact_location=location.as_uri())


def code_version() -> str:
    """The git commit of the project (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def log_report_run(settings: Settings, kind: str, name: str, params: dict[str, Any], metrics: dict[str, float],
                   report: dict[str, Any], tags: dict[str, str] | None = None,
                   frames: dict[str, pd.DataFrame] | None = None) -> str:
    """One finished MLflow run of a job that trains no registered model (scoring, uplift): tag ``kind``,
    ``params``, ``metrics``, ``report`` as ``<kind>.json`` and ``frames`` as parquet artifacts. The run is
    marked FAILED if logging fails half-way. Returns the run id."""
    mlc = client(settings)
    run = mlc.create_run(_experiment_id(settings, mlc), run_name=name,
                         tags={"kind": kind, "code_version": code_version(), **(tags or {})})
    rid = run.info.run_id
    try:
        for k, v in params.items():
            mlc.log_param(rid, k, v)
        for k, v in metrics.items():
            mlc.log_metric(rid, k, float(v))
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / f"{kind}.json"
            p.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
            mlc.log_artifact(rid, str(p))
            for fname, frame in (frames or {}).items():
                fp = Path(tmp) / f"{fname}.parquet"
                frame.to_parquet(fp, index=False)
                mlc.log_artifact(rid, str(fp))
        mlc.set_terminated(rid, "FINISHED")
    except Exception:
        mlc.set_terminated(rid, "FAILED")
        raise
    return rid


class _ModelPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc face of a saved model (serving and batch scoring load the JSON files themselves): churn gives
    calibrated probabilities, value the expected spend, next purchase the forecast columns.

    The methods carry no type hints on purpose: MLflow then validates input by the logged signature.
    """

    def load_context(self, context):
        from training.models import load_model

        self.model = load_model(context.artifacts[PRIMARY_ARTIFACT])

    def predict(self, context, model_input, params=None):
        return _predict(self.model, model_input)


def _predict(model: Any, frame: pd.DataFrame) -> Any:
    if model.kind == "churn":
        return model.predict_proba(frame)
    if model.kind == "next_purchase":
        return model.predict(frame)
    return model.predict(frame)


def _pip_requirements() -> list[str]:
    import importlib.metadata as md

    pins = [f"{k}=={v}" for k, v in library_versions().items()]
    return [*pins, f"mlflow=={md.version('mlflow')}", f"pydantic=={md.version('pydantic')}",
            f"pyyaml=={md.version('pyyaml')}"]


def _signature(model: Any, frame: pd.DataFrame) -> Any:
    from mlflow.models import infer_signature

    sample = frame[model.features].head(20).reset_index(drop=True)
    for f in model.features:  # integers come back from Feast as floats when one is missing (PITFALLS)
        sample[f] = sample[f].astype(object if f in model.categories else float)
    return infer_signature(sample, _predict(model, sample))


def _flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for method, values in metrics.items():
        prefix = "" if method == MODEL_METHOD else f"{method}."
        for k, v in values.items():
            if v is not None and np.isfinite(v):
                flat[f"{prefix}{k}"] = float(v)
    return flat


# --- logging a run -----------------------------------------------------------------------------------------


def log_model_run(settings: Settings, name: str, models: dict[str, Any], train_frame: pd.DataFrame,
                  backtest_frame: pd.DataFrame, metrics: dict[str, dict[str, float]], *,
                  figures: dict[str, Any] | None = None, extra_params: dict[str, Any] | None = None,
                  extra_tags: dict[str, str] | None = None, register: bool = True) -> ModelRun:
    """Log fitted models and their backtest to MLflow; with ``register``, register the run as ``name``
    (one version holding every model in ``models``) and make it ``challenger``.

    ``models`` maps an artifact key to a fitted model (``"model"`` is the one the pyfunc answers with; a
    next-purchase run adds ``"category"``). ``metrics`` maps a method (``"model"`` first, then the
    baselines) to its metrics on ``backtest_frame``: the model's go in plain (``auc``), the baselines'
    prefixed (``bg_nbd.auc``). ``train_frame`` is what the model was fitted on (its fingerprint is the
    run's data fingerprint); ``backtest_frame`` holds one later cutoff, on which the promotion gate
    compares versions. Runs under an active MLflow run nest in it; otherwise a new run is started.
    """
    if PRIMARY_ARTIFACT not in models:
        raise ValueError(f"log_model_run: models must include {PRIMARY_ARTIFACT!r}, got {list(models)}")
    if MODEL_METHOD not in metrics:
        raise ValueError(f"log_model_run: metrics must include the model's, under {MODEL_METHOD!r}")
    primary = models[PRIMARY_ARTIFACT]
    if primary.features is None:
        raise ValueError("log_model_run: the model is not fitted")
    cutoffs = backtest_frame[C.EVENT_TIMESTAMP].drop_duplicates()
    if len(cutoffs) != 1:
        raise ValueError(f"the backtest frame must hold one cutoff, it holds {len(cutoffs)}")
    backtest_cutoff = str(pd.Timestamp(cutoffs.iloc[0]).date())
    fp_train, fp_backtest = data_fingerprint(train_frame), data_fingerprint(backtest_frame)
    train_cutoffs = sorted({str(pd.Timestamp(t).date()) for t in train_frame[C.EVENT_TIMESTAMP].unique()})
    params: dict[str, Any] = {"kind": primary.kind, "service": primary.service,
                              "n_features": len(primary.features), "best_iteration": primary.best_iteration,
                              "train_rows": len(train_frame), "train_cutoffs": ",".join(train_cutoffs),
                              "backtest_cutoff": backtest_cutoff, "backtest_rows": len(backtest_frame),
                              **{f"lgb.{k}": v for k, v in primary.params.items()}, **(extra_params or {})}
    tags = {"model_kind": primary.kind, "feature_service": primary.service, "data_fingerprint": fp_train,
            "backtest.cutoff": backtest_cutoff, "backtest.fingerprint": fp_backtest,
            "code_version": code_version(), "settings_fingerprint": str(primary.settings_fingerprint),
            **{f"feature_service.{k}": m.service for k, m in models.items()}, **(extra_tags or {})}
    flat = _flat_metrics(metrics)

    mlc = client(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    exp_id = _experiment_id(settings, mlc)
    nested = mlflow.active_run() is not None
    with (mlflow.start_run(experiment_id=exp_id, run_name=f"{name}-model", nested=nested) as run,
          tempfile.TemporaryDirectory() as tmp):
        mlflow.log_params(params)
        mlflow.log_metrics(flat)
        mlflow.set_tags(tags)
        mlflow.log_dict({m: {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in vals.items()}
                         for m, vals in metrics.items()}, "backtest/metrics.json")
        for key, fig in (figures or {}).items():
            mlflow.log_figure(fig, f"plots/{key}.png")
        artifacts = {key: str(m.save(Path(tmp) / f"{key}.json")) for key, m in models.items()}
        info = mlflow.pyfunc.log_model(name="model", python_model=_ModelPyfunc(), artifacts=artifacts,
                                       signature=_signature(primary, backtest_frame),
                                       pip_requirements=_pip_requirements(),
                                       registered_model_name=name if register else None)
        run_id = run.info.run_id
    return _finish_run(mlc, name, primary.kind, info if register else None, run_id, tags, flat, fp_train,
                       backtest_cutoff, fp_backtest)


def _finish_run(mlc: MlflowClient, name: str, kind: str, info: Any, run_id: str, tags: dict[str, str],
                flat: dict[str, float], fp_train: str, backtest_cutoff: str, fp_backtest: str) -> ModelRun:
    """Tag the registered version (``info`` from ``log_model``; None: not registered) with the run's tags
    and metrics, make it challenger, and return the run."""
    version = None
    if info is not None:
        version = str(info.registered_model_version)
        version_tags = {**tags, **{f"metric.{k}": f"{v:.10g}" for k, v in flat.items()}, "run_id": run_id}
        for k, v in version_tags.items():
            mlc.set_model_version_tag(name, version, k, v)
        mlc.set_registered_model_alias(name, CHALLENGER, version)
    model_metrics = {k: v for k, v in flat.items() if "." not in k}
    log.info("logged %s run %s%s: %s", kind, run_id, f" as {name} v{version} (challenger)" if version else "",
             ", ".join(f"{k}={v:.4f}" for k, v in model_metrics.items()))
    return ModelRun(run_id=run_id, version=version, metrics=model_metrics, data_fingerprint=fp_train,
                    backtest_cutoff=backtest_cutoff, backtest_fingerprint=fp_backtest)


# --- the recommender ---------------------------------------------------------------------------------------


def mlflow_metric(name: str) -> str:
    """An MLflow-safe metric key (``recall@10`` -> ``recall_at_10``: MLflow refuses '@')."""
    return name.replace("@", "_at_")


class _RecommendPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc face of the recommender: a frame of ``member_id`` in, their top ``settings.recommend.n`` out
    (long frame, training.recommend.RC columns). Serving loads the files itself."""

    def load_context(self, context):
        from training.recommend import Recommender

        self.model = Recommender.load(context.artifacts[PRIMARY_ARTIFACT])

    def predict(self, context, model_input, params=None):
        return _recommend(self.model, model_input)


def _recommend(model: Any, frame: pd.DataFrame) -> pd.DataFrame:
    out = model.recommend(frame[C.MEMBER_ID].astype(str).tolist())
    return out.astype({"because_item": str}).fillna("")


def log_recommend_run(settings: Settings, model: Any, artifacts: dict[str, Path],
                      metrics: dict[str, dict[str, float]], *, train_fingerprint: str, backtest_cutoff: str,
                      backtest_fingerprint: str, params: dict[str, Any], register: bool = True) -> ModelRun:
    """Log a fitted recommender (``artifacts``: ``model`` its saved file, plus the basket rules and the
    similar-items model) with its backtest beside the baselines; with ``register``, register it as
    ``recommend`` and make it challenger. Metric keys go to MLflow with '@' as '_at_'."""
    from mlflow.models import infer_signature

    mlc = client(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    exp_id = _experiment_id(settings, mlc)
    flat = {mlflow_metric(k): v for k, v in _flat_metrics(metrics).items()}
    tags = {"model_kind": RECOMMEND_MODEL, "data_fingerprint": train_fingerprint,
            "backtest.cutoff": backtest_cutoff, "backtest.fingerprint": backtest_fingerprint,
            "code_version": code_version(), "settings_fingerprint": str(model.fingerprint())}
    sample = pd.DataFrame({C.MEMBER_ID: [str(m) for m in model.members[:3]]})
    nested = mlflow.active_run() is not None
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{RECOMMEND_MODEL}-model", nested=nested) as run:
        mlflow.log_params({"kind": RECOMMEND_MODEL, "members": len(model.members), "items": len(model.items),
                           **{f"als.{k}": v for k, v in model.params.items()}, **params})
        mlflow.log_metrics(flat)
        mlflow.set_tags(tags)
        mlflow.log_dict(metrics, "backtest/metrics.json")
        info = mlflow.pyfunc.log_model(name="model", python_model=_RecommendPyfunc(),
                                       artifacts={k: str(v) for k, v in artifacts.items()},
                                       signature=infer_signature(sample, _recommend(model, sample)),
                                       pip_requirements=_pip_requirements(),
                                       registered_model_name=RECOMMEND_MODEL if register else None)
        run_id = run.info.run_id
    return _finish_run(mlc, RECOMMEND_MODEL, RECOMMEND_MODEL, info if register else None, run_id, tags, flat,
                       train_fingerprint, backtest_cutoff, backtest_fingerprint)


def log_churn_run(settings: Settings, model: ChurnModel, train_frame: pd.DataFrame,
                  backtest_frame: pd.DataFrame,
                  name: str = CHURN_MODEL, extra_params: dict[str, Any] | None = None) -> ModelRun:
    """:func:`log_model_run` for a churn model alone, its metrics measured here on ``backtest_frame``."""
    y = backtest_frame[L.CHURN].to_numpy(dtype=float)
    metrics = {MODEL_METHOD: churn_metrics(y, model.predict_proba(backtest_frame))}
    return log_model_run(settings, name, {PRIMARY_ARTIFACT: model}, train_frame, backtest_frame, metrics,
                         extra_params=extra_params)


# --- promotion, rollback, history --------------------------------------------------------------------------


def _by_alias(mlc: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return mlc.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def alias_version(settings: Settings, name: str, alias: str = CHAMPION) -> str | None:
    """The version ``name@alias`` points at now, or None when there is no such alias (one registry call:
    cheap enough for a service to poll)."""
    mv = _by_alias(client(settings), name, alias)
    return None if mv is None else str(mv.version)


def download_registered(settings: Settings, name: str, alias: str = CHAMPION,
                        dst: Path | None = None) -> tuple[str, Path]:
    """(version, folder of the pyfunc's artifacts) of ``name@alias``; a LookupError saying how to make one
    when the alias is not set. The files are fetched by the version number the alias gave, so a promotion
    during the download cannot pair one version's number with another version's files."""
    mlc = client(settings)
    mv = _by_alias(mlc, name, alias)
    if mv is None:
        how = "repurchase train recommend" if name == RECOMMEND_MODEL else f"repurchase train {name}"
        raise LookupError(f"no {name}@{alias} in the registry at {settings.tracking_uri}: run `{how}` and "
                          f"`repurchase models promote {name}`")
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    # a progress bar per model on stderr is noise in a CLI summary and in the service's log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}",
                                                    dst_path=None if dst is None else str(dst)))
    return str(mv.version), root / "artifacts"


def _metric(mv: ModelVersion, metric: str) -> float:
    key = f"metric.{metric}"
    if key not in mv.tags:
        raise PromotionError(f"{mv.name} v{mv.version} has no tag {key!r}; it was not logged by "
                             "log_model_run")
    return float(mv.tags[key])


def champion_history(settings: Settings, name: str = CHURN_MODEL) -> list[dict[str, Any]]:
    """Every change of ``champion`` for ``name``, oldest first: seq, at (UTC ISO time), action
    (promote/rollback), version (the new champion), previous, and the metric behind a promotion."""
    tags = client(settings).get_registered_model(name).tags
    events = [json.loads(v) for k, v in tags.items() if k.startswith(EVENT_TAG_PREFIX)]
    return sorted(events, key=lambda e: e["seq"])


def champion_at(settings: Settings, when: datetime | str, name: str = CHURN_MODEL) -> str | None:
    """The version that was champion at ``when`` (None before the first promotion)."""
    t = pd.Timestamp(when)
    t = t.tz_localize("UTC") if t.tzinfo is None else t
    current = None
    for e in champion_history(settings, name):
        if pd.Timestamp(e["at"]) <= t:
            current = e["version"]
    return current


def _record(mlc: MlflowClient, name: str, history: list[dict[str, Any]], **event: Any) -> dict[str, Any]:
    seq = (history[-1]["seq"] + 1) if history else 1
    entry = {"seq": seq, "at": datetime.now(UTC).isoformat(), **event}
    mlc.set_registered_model_tag(name, f"{EVENT_TAG_PREFIX}{seq:06d}", json.dumps(entry))
    return entry


def promote(settings: Settings, name: str = CHURN_MODEL, backtest_metric: str | None = None) -> Promotion:
    """Make the challenger champion if it beats the champion on ``backtest_metric`` over the same backtest
    (same cutoff and backtest data fingerprint); otherwise leave everything as it is. Returns the comparison
    (``.summary()`` is the line a CLI prints)."""
    backtest_metric = backtest_metric or PROMOTION_METRIC.get(name, "auc")
    mlc = client(settings)
    challenger = _by_alias(mlc, name, CHALLENGER)
    if challenger is None:
        raise PromotionError(f"registered model {name!r} has no {CHALLENGER!r} version: log a run first")
    champion = _by_alias(mlc, name, CHAMPION)
    c_value = _metric(challenger, backtest_metric)

    def result(promoted: bool, reason: str, champ_value: float | None = None) -> Promotion:
        out = Promotion(name=name, metric=backtest_metric, challenger=str(challenger.version),
                        champion=None if champion is None else str(champion.version),
                        challenger_value=c_value,
                        champion_value=champ_value, promoted=promoted, reason=reason)
        log.info("promotion gate: %s", out.summary())
        return out

    if champion is None:
        reason = "no champion yet"
        champ_value = None
    else:
        champ_value = _metric(champion, backtest_metric)
        if str(champion.version) == str(challenger.version):
            return result(False, "the challenger is already champion", champ_value)
        for tag in ("backtest.cutoff", "backtest.fingerprint"):
            if champion.tags.get(tag) != challenger.tags.get(tag):
                return result(False, f"not the same backtest: {tag} {challenger.tags.get(tag)} (challenger) "
                              f"vs {champion.tags.get(tag)} (champion); evaluate both on one backtest",
                              champ_value)
        lower = backtest_metric in LOWER_IS_BETTER
        better = c_value < champ_value if lower else c_value > champ_value
        if not better:
            wins = f"{'lower' if lower else 'higher'} {backtest_metric} wins"
            return result(False, f"not better ({wins})", champ_value)
        reason = f"{backtest_metric} {'lower' if lower else 'higher'} by {abs(c_value - champ_value):.4g}"
    history = champion_history(settings, name)
    mlc.set_registered_model_alias(name, CHAMPION, str(challenger.version))
    _record(mlc, name, history, action="promote", version=str(challenger.version),
            previous=None if champion is None else str(champion.version), metric=backtest_metric,
            value=c_value, backtest_cutoff=challenger.tags.get("backtest.cutoff"))
    return result(True, reason, champ_value)


def _champion_stack(history: list[dict[str, Any]]) -> list[str]:
    stack: list[str] = []
    for e in history:
        if e["action"] == "promote":
            stack.append(e["version"])
        elif e["action"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(settings: Settings, name: str = CHURN_MODEL) -> str:
    """Move ``champion`` back to the version that was champion before the current one; returns it."""
    mlc = client(settings)
    history = champion_history(settings, name)
    stack = _champion_stack(history)
    if len(stack) < 2:
        raise PromotionError(f"{name}: no previous champion to roll back to (champion history: "
                             f"{[e['version'] for e in history] or 'empty'})")
    current, previous = stack[-1], stack[-2]
    mlc.set_registered_model_alias(name, CHAMPION, previous)
    _record(mlc, name, history, action="rollback", version=previous, previous=current)
    log.info("%s: champion rolled back from v%s to v%s", name, current, previous)
    return previous


def run_summary(run: ModelRun) -> dict[str, Any]:
    """A plain dict of a run, for printing or JSON."""
    return {k: (v if not isinstance(v, float | np.floating) else float(v)) for k, v in asdict(run).items()}
