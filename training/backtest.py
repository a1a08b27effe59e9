"""Honest time-based backtests of the member models, their baselines beside them on the same rows.

A backtest at cutoff ``D`` with label window ``W`` (the churn horizon, the value horizon, or for next
purchase the churn horizon as the least follow-up):

- training cutoffs ``D - W - k * every`` (k = 0 .. n - 1, ``settings.training``), with labels read only up
  to ``D`` (``end = D - 1 day``): every training label is observed before the backtest starts, and next-
  purchase durations are censored at ``D``;
- the latest training cutoff is the validation fold (early stopping, calibration); optuna searches on
  expanding time folds inside the training cutoffs (:mod:`training.tuning`);
- features for every cutoff come from Feast's point-in-time join (``build_training_set``); snapshots
  missing at a cutoff are computed first, with the same feature code as everything else;
- the model and its baselines (:mod:`training.evaluate`) are scored on the members who joined before
  ``D``, with labels from ``D`` on.

Example::

    result = run_backtest(settings, "churn", date(1998, 1, 1), horizon_days=181)
    result.metrics["model"]["auc"], result.metrics["bg_nbd"]["auc"]
    result.report()                       # JSON-able: {"model": {...}, "rfm_rule": {...}, "bg_nbd": {...}}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd

from features.contract import C
from features.definitions import CHURN_SERVICE, NEXT_PURCHASE_SERVICE, VALUE_SERVICE
from features.lake import MEMBER_CATEGORY_VIEW, MEMBER_VIEW, snapshot_dates
from features.settings import Settings
from training.dataset import (
    build_category_training_set,
    build_training_set,
    last_data_day,
    read_lake_table,
)
from training.evaluate import (
    MODEL,
    churn_baselines,
    churn_metrics,
    next_purchase_baselines,
    next_purchase_metrics,
    value_baselines,
    value_metrics,
)
from training.labels import L
from training.models import sample_by_member
from training.tracking import CHURN_MODEL as CHURN
from training.tracking import NEXT_PURCHASE_MODEL as NEXT_PURCHASE
from training.tracking import REGISTERED_MODELS
from training.tracking import VALUE_MODEL as VALUE
from training.tuning import TuningResult, time_folds, tune

log = logging.getLogger(__name__)

KINDS = REGISTERED_MODELS
"""Model kinds, spelled as their registered models."""
SERVICES = {CHURN: CHURN_SERVICE, NEXT_PURCHASE: NEXT_PURCHASE_SERVICE, VALUE: VALUE_SERVICE}
CATEGORY = "category"
"""Artifact key of the per-category next-purchase model beside the member-level one."""

Progress = Callable[[str], None]


class BacktestError(RuntimeError):
    """A backtest that cannot be run as asked (cutoff too late or too early for the data, ...)."""


@dataclass
class BacktestResult:
    """What :func:`run_backtest` measured, and the fitted models."""

    kind: str
    cutoff: date
    horizon_days: int
    train_cutoffs: list[date]
    metrics: dict[str, dict[str, float]]
    models: dict[str, Any]
    train_frame: pd.DataFrame
    test_frame: pd.DataFrame
    settings: Settings
    tuning: TuningResult | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """The metrics keyed by method, the model first, with NaN as None (JSON-able)."""
        return {m: {k: (None if v is None or not np.isfinite(v) else round(float(v), 6)) for k, v in vals.items()}
                for m, vals in self.metrics.items()}

    def summary(self) -> dict[str, Any]:
        """Report plus what was backtested and how long it took."""
        return {"kind": self.kind, "cutoff": self.cutoff.isoformat(), "horizon_days": self.horizon_days,
                "train_cutoffs": [c.isoformat() for c in self.train_cutoffs],
                "train_rows": len(self.train_frame), "test_rows": len(self.test_frame),
                "tuning_trials": self.tuning.trials if self.tuning else 0,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}, "metrics": self.report()}


def _noop(_msg: str) -> None:
    return None


def effective_settings(settings: Settings, kind: str, horizon_days: int | None) -> Settings:
    """``settings`` with the label window of ``kind`` set to ``horizon_days`` (when given)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if horizon_days is None:
        return settings
    if horizon_days < 1:
        raise ValueError(f"--horizon must be at least 1 day, got {horizon_days}")
    if kind == VALUE:
        return settings.model_copy(update={"training": settings.training.model_copy(
            update={"value_horizon_days": int(horizon_days)})})
    return settings.model_copy(update={"lifecycle": settings.lifecycle.model_copy(
        update={"churn_horizon_days": int(horizon_days)})})


def label_window_days(settings: Settings, kind: str) -> int:
    """Days after a cutoff that its label needs observed."""
    return settings.training.value_horizon_days if kind == VALUE else settings.lifecycle.horizon_days


def training_cutoffs(settings: Settings, kind: str, cutoff: date) -> list[date]:
    """The training cutoffs of a backtest at ``cutoff``, oldest first: ``settings.training.cutoffs`` dates
    at least ``cutoff_every_days`` apart, the latest ``label window`` days before ``cutoff``. Existing
    member snapshot dates are preferred (the workspace's weekly history); without enough of them the
    dates are ``cutoff - window - k * every`` and their snapshots are computed by the backtest."""
    window = label_window_days(settings, kind)
    every, n = settings.training.cutoff_every_days, settings.training.cutoffs
    last = cutoff - timedelta(days=window)
    picked: list[date] = []
    for d in reversed(snapshot_dates(settings, MEMBER_VIEW)):
        if d > last or (picked and (picked[-1] - d).days < every):
            continue
        picked.append(d)
        if len(picked) == n:
            return sorted(picked)
    return [last - timedelta(days=k * every) for k in range(n - 1, -1, -1)]


def latest_cutoff(settings: Settings, kind: str) -> date:
    """The latest member snapshot date whose label window ends within the data (the default backtest
    cutoff of ``repurchase train``)."""
    window = timedelta(days=label_window_days(settings, kind))
    end_excl = last_data_day(settings) + timedelta(days=1)
    for d in reversed(snapshot_dates(settings, MEMBER_VIEW)):
        if d + window <= end_excl:
            return d
    raise BacktestError(f"no member snapshot leaves a full {window.days}-day label window before the end of "
                        f"the data ({end_excl - timedelta(days=1)}): build features with --history, or "
                        "shorten the horizon")


def ensure_snapshots(settings: Settings, dates: list[date], views: tuple[str, ...] = (MEMBER_VIEW,
                     MEMBER_CATEGORY_VIEW)) -> list[date]:
    """Compute the member (and member x category) snapshots missing at ``dates``; returns those computed."""
    from features.compute import compute_features

    have = set(snapshot_dates(settings, MEMBER_VIEW)) & set(snapshot_dates(settings, MEMBER_CATEGORY_VIEW))
    missing = sorted(set(dates) - have)
    if missing:
        log.info("computing %d missing feature snapshot(s): %s", len(missing), ", ".join(map(str, missing)))
        compute_features(settings, missing, views=views)
    return missing


def _make_model(kind: str, settings: Settings, params: dict[str, Any]) -> Any:
    from training.models import ChurnModel, ValueModel
    from training.next_purchase import NextPurchaseModel

    threads = settings.training.num_threads
    if kind == CHURN:
        return ChurnModel(settings=settings, params=params, num_threads=threads)
    if kind == VALUE:
        return ValueModel(settings=settings, params=params, num_threads=threads)
    return NextPurchaseModel.member(settings, params=params, num_threads=threads)


def _split_last(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    ts = frame[C.EVENT_TIMESTAMP]
    last = ts.max()
    return frame[ts < last], frame[ts == last]


def run_backtest(settings: Settings, kind: str, cutoff: date, horizon_days: int | None = None, *,
                 tune_params: bool = True, log_trials: bool = False, with_figures: bool = True,
                 progress: Progress | None = None) -> BacktestResult:
    """Fit ``kind`` on the training cutoffs of ``cutoff`` and evaluate it and its baselines at ``cutoff``.

    ``horizon_days`` overrides the label window (churn: no purchase in the next H days; value: spend in
    the next H days; next purchase: the least follow-up of the training cutoffs). ``log_trials`` logs each
    optuna trial as a nested MLflow run (an MLflow run must be active).
    """
    progress = progress or _noop
    s = effective_settings(settings, kind, horizon_days)
    horizon = label_window_days(s, kind)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    end = last_data_day(s)
    if cutoff + timedelta(days=horizon) > end + timedelta(days=1) and kind != NEXT_PURCHASE:
        raise BacktestError(f"cutoff {cutoff}: its {horizon}-day label window ends after the data ({end}); "
                            f"the latest possible cutoff is {end + timedelta(days=1) - timedelta(days=horizon)}")
    cutoffs = training_cutoffs(s, kind, cutoff)
    first_tx = pd.Timestamp(read_lake_table(s, "transactions", columns=[C.TS])[C.TS].min()).date()
    if cutoffs[0] <= first_tx:
        raise BacktestError(f"cutoff {cutoff}: the earliest training cutoff would be {cutoffs[0]}, not after the "
                            f"first transaction ({first_tx}); choose a later cutoff, a shorter --horizon, or "
                            "fewer training.cutoffs")
    progress(f"{kind}: training cutoffs {', '.join(map(str, cutoffs))}, backtest {cutoff}")
    ensure_snapshots(s, [*cutoffs, cutoff])
    seconds["snapshots"] = time.perf_counter() - t0

    t = time.perf_counter()
    service = SERVICES[kind]
    bound = s.training.max_train_rows
    train_all = build_training_set(s, cutoffs, service, end=cutoff - timedelta(days=1), max_rows=bound)
    test = build_training_set(s, [cutoff], service, max_rows=s.training.max_backtest_rows)
    if kind == VALUE:
        test = test[test[L.SPEND_OBSERVABLE]].reset_index(drop=True)
    seconds["training_sets"] = time.perf_counter() - t
    if test.empty:
        raise BacktestError(f"no member joined before the backtest cutoff {cutoff}")

    tuning = None
    params: dict[str, Any] = {}
    if tune_params and s.training.tuning.trials > 0 and len(cutoffs) >= 3:
        t = time.perf_counter()
        progress(f"{kind}: tuning (at most {s.training.tuning.trials} trials, {s.training.tuning.timeout_s:.0f} s)")
        sample = sample_by_member(train_all, s.training.tuning.max_rows)
        tuning = tune(lambda p: _make_model(kind, s, p), time_folds(sample, n_folds=2), s.training.tuning,
                      log_to_mlflow=log_trials)
        params = tuning.best_params
        seconds["tuning"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"{kind}: fitting on {len(train_all):,} rows")
    train, valid = _split_last(train_all)
    model = _make_model(kind, s, params).fit(train, valid)
    models: dict[str, Any] = {MODEL: model}
    category_frames = None
    if kind == NEXT_PURCHASE:
        category_frames = _fit_category_model(s, cutoffs, cutoff, models)
    seconds["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"{kind}: evaluating on {len(test):,} members at {cutoff}")
    transactions = read_lake_table(s, "transactions")
    metrics, figures = _evaluate(s, kind, model, test, transactions, horizon, with_figures)
    if category_frames is not None and CATEGORY in models:
        cat_test = category_frames
        cat_pred = models[CATEGORY].predict(cat_test)
        metrics[f"{MODEL}.{CATEGORY}"] = next_purchase_metrics(
            cat_test[L.CAT_DAYS_TO_NEXT], cat_test[L.CAT_NEXT_EVENT], cat_pred)
    seconds["evaluate"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    log.info("backtest %s at %s: %s", kind, cutoff, {m: v.get(_headline(kind)) for m, v in metrics.items()})
    return BacktestResult(kind=kind, cutoff=cutoff, horizon_days=horizon, train_cutoffs=cutoffs, metrics=metrics,
                          models=models, train_frame=train_all, test_frame=test, settings=s, tuning=tuning,
                          figures=figures, seconds=seconds)


def _headline(kind: str) -> str:
    return {CHURN: "auc", NEXT_PURCHASE: "c_index", VALUE: "rmse"}[kind]


def _fit_category_model(s: Settings, cutoffs: list[date], cutoff: date,
                        models: dict[str, Any]) -> pd.DataFrame | None:
    """Fit the per-category next-purchase model when the data has replenishable categories; returns its
    backtest frame (or None)."""
    from training.next_purchase import NextPurchaseModel

    train_all = build_category_training_set(s, cutoffs, end=cutoff - timedelta(days=1),
                                            max_rows=s.training.max_train_rows)
    if train_all is None or train_all[C.EVENT_TIMESTAMP].nunique() < 2:
        log.info("no replenishable categories with purchases at two cutoffs: no per-category model")
        return None
    test = build_category_training_set(s, [cutoff], max_rows=s.training.max_backtest_rows)
    if test is None or test.empty:
        return None
    train, valid = _split_last(train_all)
    models[CATEGORY] = NextPurchaseModel.category(s, num_threads=s.training.num_threads).fit(train, valid)
    return test


def _evaluate(s: Settings, kind: str, model: Any, test: pd.DataFrame, transactions: pd.DataFrame,
              horizon: int, with_figures: bool) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    from training import plots

    figures: dict[str, Any] = {}
    if kind == CHURN:
        y = test[L.CHURN].to_numpy(dtype=float)
        scores = {MODEL: model.predict_proba(test), **churn_baselines(test, transactions, horizon, s.rfm.bins)}
        metrics = {m: churn_metrics(y, sc) for m, sc in scores.items()}
        if with_figures:
            figures = {"roc": plots.roc_figure(y, scores), "calibration": plots.calibration_figure(y, scores[MODEL]),
                       "lift": plots.lift_figure(y, scores[MODEL])}
    elif kind == NEXT_PURCHASE:
        preds = {MODEL: model.predict(test),
                 **next_purchase_baselines(test, transactions, s.training.interval,
                                           max_days=max(s.training.next_purchase_bins_days))}
        d, e = test[L.DAYS_TO_NEXT], test[L.NEXT_EVENT]
        metrics = {m: next_purchase_metrics(d, e, p) for m, p in preds.items()}
        if with_figures:
            followed = (e.to_numpy() | (d.to_numpy() >= 30))
            y30 = (e.to_numpy() & (d.to_numpy() < 30))[followed].astype(float)
            p30 = preds[MODEL]["p_30d"].to_numpy()[followed]
            figures = {"roc_30d": plots.roc_figure(y30, {m: p["p_30d"].to_numpy()[followed]
                                                        for m, p in preds.items()}, "P(purchase within 30 days)"),
                       "calibration_30d": plots.calibration_figure(y30, p30, "Calibration of P(within 30 days)")}
    else:
        y = test[L.SPEND_NEXT].to_numpy(dtype=float)
        preds_v = {MODEL: model.predict(test),
                   **value_baselines(test, transactions, horizon, s.features.windows_days)}
        metrics = {m: value_metrics(y, p) for m, p in preds_v.items()}
        if with_figures:
            figures = {"deciles": plots.decile_figure(y, preds_v[MODEL])}
    if with_figures:
        figures["feature_importance"] = plots.importance_figure(model.feature_importance())
    return metrics, figures
