"""Hyper-parameter search with optuna on time-based folds, bounded by trials and time from settings.

A fold is a (train, valid) pair of training-set frames in which every validation row is later than every
training row (:func:`time_folds`); a trial fits one model per fold and scores it by the validation loss
LightGBM reports at its best iteration (binary log loss for churn and the next-purchase hazard, the
Tweedie deviance for value: proper scoring rules, lower is better). Every trial is an MLflow run nested
under the active run, with its parameters and its loss; optuna's own MLflow callback is deprecated and
not needed (PITFALLS.md).

Example::

    folds = time_folds(train_frame, n_folds=2)
    result = tune(lambda params: ChurnModel(settings, params=params), folds, settings.training.tuning)
    result.best_params          # {'learning_rate': 0.07, 'num_leaves': 23, ...}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from features.contract import C
from features.settings import TuningSettings

log = logging.getLogger(__name__)

Fold = tuple[pd.DataFrame, pd.DataFrame]


@dataclass(frozen=True)
class TuningResult:
    """The best parameters found and what the search cost."""

    best_params: dict[str, Any]
    best_loss: float
    default_loss: float
    trials: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def time_folds(frame: pd.DataFrame, n_folds: int = 2) -> list[Fold]:
    """Expanding-window folds over the frame's cutoffs: fold k validates on the k-th latest cutoff and
    trains on every earlier one. Needs at least ``n_folds + 1`` cutoffs (fewer folds are returned, with a
    warning, when the frame has fewer)."""
    stamps = sorted(frame[C.EVENT_TIMESTAMP].drop_duplicates())
    if len(stamps) < 2:
        raise ValueError(f"time_folds needs at least two cutoffs, the frame has {len(stamps)}")
    n = min(n_folds, len(stamps) - 1)
    if n < n_folds:
        log.warning("only %d time fold(s) from %d cutoffs", n, len(stamps))
    folds = []
    for valid_at in stamps[-n:]:
        ts = frame[C.EVENT_TIMESTAMP]
        folds.append((frame[ts < valid_at], frame[ts == valid_at]))
    return folds


def suggest_params(trial: Any) -> dict[str, Any]:
    """The search space shared by the LightGBM models (LightGBM parameter names)."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.03, 0.3, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 7, 63, log=True),
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 20, 500, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "bagging_freq": 1,
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
    }


def validation_loss(model: Any) -> float:
    """The loss LightGBM recorded on the validation set at the model's best iteration."""
    booster = getattr(model, "final_booster", model.booster)  # a two-stage model's score is its last stage's
    scores = getattr(booster, "best_score", None) or {}
    for metrics in scores.values():
        for value in metrics.values():
            return float(value)
    raise ValueError("the fitted model recorded no validation score (was it fitted with a validation frame?)")


def _cross_validate(make_model: Callable[[dict[str, Any]], Any], params: dict[str, Any],
                    folds: Sequence[Fold]) -> tuple[float, list[int]]:
    losses, rounds = [], []
    for train, valid in folds:
        model = make_model(params).fit(train, valid)
        losses.append(validation_loss(model))
        rounds.append(int(model.best_iteration or 0))
    return float(sum(losses) / len(losses)), rounds


def tune(make_model: Callable[[dict[str, Any]], Any], folds: Sequence[Fold], bounds: TuningSettings,
         log_to_mlflow: bool = True) -> TuningResult:
    """Search LightGBM parameters with optuna's TPE sampler (seeded), at most ``bounds.trials`` trials
    and no new trial after ``bounds.timeout_s`` seconds. The default parameters (``make_model({})``) are
    the first trial, so the result is never worse than them on the folds. With ``log_to_mlflow`` each
    trial is a nested MLflow run under the active one."""
    import optuna

    if not folds:
        raise ValueError("tune needs at least one (train, valid) fold")
    started = time.perf_counter()
    if bounds.trials == 0:
        return TuningResult({}, math.nan, math.nan, 0, 0.0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=bounds.seed))
    history: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params = {} if trial.number == 0 else suggest_params(trial)
        t0 = time.perf_counter()
        loss, rounds = _cross_validate(make_model, params, folds)
        record = {"trial": trial.number, "loss": loss, "rounds": rounds, "seconds": time.perf_counter() - t0,
                  **params}
        history.append(record)
        if log_to_mlflow:
            log_trial(trial.number, params, {"valid_loss": loss, "seconds": record["seconds"],
                                             "best_iteration_mean": sum(rounds) / len(rounds)})
        log.info("trial %d: loss %.5f (%s)", trial.number, loss, params or "defaults")
        return loss

    study.optimize(objective, n_trials=bounds.trials, timeout=bounds.timeout_s, gc_after_trial=True)
    best = study.best_trial
    best_params = {} if best.number == 0 else suggest_params(optuna.trial.FixedTrial(best.params))
    result = TuningResult(best_params=best_params, best_loss=float(best.value),
                          default_loss=float(history[0]["loss"]), trials=len(study.trials),
                          seconds=time.perf_counter() - started, history=history)
    log.info("tuning: %d trials in %.0f s, best loss %.5f (defaults %.5f)", result.trials, result.seconds,
             result.best_loss, result.default_loss)
    return result


def log_trial(number: int, params: dict[str, Any], metrics: dict[str, float], prefix: str = "lgb") -> None:
    """One trial as an MLflow run nested under the active one: its parameters (``prefix.name``, or
    ``prefix.defaults`` for the default trial) and ``metrics``."""
    import mlflow

    parent = mlflow.active_run()
    experiment = parent.info.experiment_id if parent is not None else None
    with mlflow.start_run(run_name=f"trial-{number:03d}", nested=True, experiment_id=experiment):
        mlflow.log_params({"trial": number, **({f"{prefix}.{k}": v for k, v in params.items()} or
                                               {f"{prefix}.defaults": True})})
        mlflow.log_metrics(metrics)
