"""optuna tuning on time folds, with every trial a nested run in a real (temporary) MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.contract import C, F
from features.settings import TuningSettings
from training.labels import L
from training.models import ChurnModel
from training.tuning import time_folds, tune, validation_loss


def _frame(n_per_cutoff: int = 600, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for k, day in enumerate(pd.date_range("2024-01-01", periods=4, freq="28D", tz="UTC")):
        rec = rng.exponential(40, n_per_cutoff)
        orders = rng.poisson(4, n_per_cutoff)
        logit = 0.04 * rec - 0.4 * orders - 0.5 + 0.1 * k
        parts.append(pd.DataFrame({
            C.MEMBER_ID: [f"M{i:04d}" for i in range(n_per_cutoff)], C.EVENT_TIMESTAMP: day,
            L.CHURN: (rng.random(n_per_cutoff) < 1 / (1 + np.exp(-logit))).astype(int),
            F.RECENCY_DAYS: rec, F.ORDERS_TOTAL: orders, F.RECENCY_GAP_RATIO: rec / 30,
        }))
    frame = pd.concat(parts, ignore_index=True)
    frame.attrs["features"] = [F.RECENCY_DAYS, F.ORDERS_TOTAL, F.RECENCY_GAP_RATIO]
    return frame


def test_time_folds_validate_on_later_cutoffs_only() -> None:
    frame = _frame(50)
    folds = time_folds(frame, n_folds=2)
    stamps = sorted(frame[C.EVENT_TIMESTAMP].unique())
    assert [v[C.EVENT_TIMESTAMP].unique().tolist() for _, v in folds] == [[stamps[2]], [stamps[3]]]
    for train, valid in folds:
        assert train[C.EVENT_TIMESTAMP].max() < valid[C.EVENT_TIMESTAMP].min()
    assert len(folds[1][0]) == 3 * 50
    with pytest.raises(ValueError, match="at least two cutoffs"):
        time_folds(frame[frame[C.EVENT_TIMESTAMP] == stamps[0]])


@pytest.mark.slow
def test_tune_logs_every_trial_and_never_loses_to_the_defaults(tmp_path: Path) -> None:
    import mlflow

    frame = _frame()
    folds = time_folds(frame, n_folds=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("tuning", artifact_location=(tmp_path / "artifacts").as_uri())
    bounds = TuningSettings(trials=4, timeout_s=120, seed=3)

    def make(params: dict) -> ChurnModel:
        return ChurnModel(params=params, num_boost_round=80, early_stopping_rounds=10, num_threads=1)

    with mlflow.start_run(experiment_id=exp) as parent:
        result = tune(make, folds, bounds)
    assert result.trials == 4 and len(result.history) == 4
    assert result.history[0]["loss"] == pytest.approx(result.default_loss)
    assert result.best_loss <= result.default_loss
    assert result.best_loss == pytest.approx(min(h["loss"] for h in result.history))
    # the best parameters, refitted, reproduce the best loss on the folds (seeded, deterministic)
    refit = np.mean([validation_loss(make(result.best_params).fit(t, v)) for t, v in folds])
    assert refit == pytest.approx(result.best_loss, rel=1e-9)
    children = mlflow.search_runs(experiment_ids=[exp],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert sorted(children["metrics.valid_loss"].round(9)) == sorted(round(h["loss"], 9) for h in result.history)
    again = tune(make, folds, bounds, log_to_mlflow=False)
    assert again.best_params == result.best_params  # seeded sampler: same data, same trials


def test_zero_trials_means_defaults() -> None:
    result = tune(lambda p: None, [(pd.DataFrame(), pd.DataFrame())], TuningSettings(trials=0))
    assert result.best_params == {} and result.trials == 0
