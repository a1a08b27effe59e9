"""`repurchase train`, `backtest` and `models`: real Feast store, real MLflow store (temporary), CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(demo_workspace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    settings, _ = demo_workspace
    tmp = tmp_path_factory.mktemp("mlflow-cli")
    return {"REPURCHASE_HOME": str(settings.dirs.home), "COLUMNS": "200",
            "REPURCHASE__MLFLOW__TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "REPURCHASE__MLFLOW__ARTIFACT_ROOT": str(tmp / "artifacts"),
            "REPURCHASE__TRAINING__TUNING__TRIALS": "2", "REPURCHASE__TRAINING__NUM_THREADS": "1"}


def invoke(env: dict[str, str], *args: str, **extra: str):
    return runner.invoke(app, list(args), env={**env, **extra})


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_train_promote_rollback_through_the_cli(env: dict[str, str]) -> None:
    first = invoke(env, "train", "churn", "--json")
    assert first.exit_code == 0, first.output
    rep = last_json(first.stdout)
    assert rep["registered_model"] == "churn" and rep["version"] == "1"
    assert list(rep["metrics"])[:3] == ["model", "rfm_rule", "bg_nbd"]
    assert rep["metrics"]["model"]["auc"] > 0.7
    assert rep["tuning_trials"] == 2
    cutoffs = rep["train_cutoffs"]
    assert max(cutoffs) < rep["cutoff"]  # the model never saw the backtest cutoff

    from mlflow.tracking import MlflowClient

    mlc = MlflowClient(env["REPURCHASE__MLFLOW__TRACKING_URI"])
    run = mlc.get_run(rep["run_id"])
    assert run.data.metrics["auc"] == pytest.approx(rep["metrics"]["model"]["auc"], abs=1e-6)
    assert run.data.metrics["bg_nbd.auc"] == pytest.approx(rep["metrics"]["bg_nbd"]["auc"], abs=1e-6)
    assert {"feature_service", "data_fingerprint", "code_version", "backtest.fingerprint"} <= set(run.data.tags)
    plots = {a.path for a in mlc.list_artifacts(rep["run_id"], "plots")}
    assert plots == {f"plots/{p}.png" for p in ("roc", "calibration", "lift", "feature_importance")}
    trials = mlc.search_runs([run.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{run.data.tags['mlflow.parentRunId']}'")
    assert sum(r.info.run_name.startswith("trial-") for r in trials) == 2  # every optuna trial is a run

    promoted = invoke(env, "models", "promote", "churn", "--json")
    assert promoted.exit_code == 0, promoted.output
    assert last_json(promoted.stdout)["promoted"] is True

    # a deliberately worse challenger: 60 training rows and no tuning
    worse = invoke(env, "train", "churn", "--json", REPURCHASE__TRAINING__MAX_TRAIN_ROWS="60",
                   REPURCHASE__TRAINING__TUNING__TRIALS="0")
    assert worse.exit_code == 0, worse.output
    worse_rep = last_json(worse.stdout)
    assert worse_rep["version"] == "2"
    assert worse_rep["metrics"]["model"]["auc"] < rep["metrics"]["model"]["auc"]
    refused = invoke(env, "models", "promote", "churn")
    assert refused.exit_code == 1, refused.output
    assert "refused" in refused.output and "v2" in refused.output and "v1" in refused.output

    no_back = invoke(env, "models", "rollback", "churn")
    assert no_back.exit_code == 2 and "no previous champion" in no_back.output
    history = last_json(invoke(env, "models", "history", "churn", "--json").stdout)["history"]
    assert [(e["action"], e["version"]) for e in history] == [("promote", "1")]


def test_backtest_json_is_keyed_by_method_model_first(env: dict[str, str], demo_workspace) -> None:
    settings, _ = demo_workspace
    from training.backtest import latest_cutoff

    cutoff = latest_cutoff(settings, "next_purchase").isoformat()
    result = invoke(env, "backtest", "next-purchase", "--cutoff", cutoff, "--no-tune", "--json")
    assert result.exit_code == 0, result.output
    metrics = last_json(result.stdout)
    assert next(iter(metrics)) == "model" and {"mean_gap", "bg_nbd"} <= set(metrics)
    for method in ("model", "bg_nbd"):
        assert 0.5 < metrics[method]["c_index"] <= 1.0
    # "due at gap - recency" calls every overdue member due now, though most of them have lapsed: the
    # member's own gap ranks worse than chance, which is why it is only a baseline
    assert 0 < metrics["mean_gap"]["c_index"] < metrics["model"]["c_index"]
    assert metrics["model"]["brier_30d"] <= metrics["bg_nbd"]["brier_30d"]
    assert 0.6 < metrics["model"]["coverage"] < 0.95


def test_value_backtest_and_bad_input(env: dict[str, str], demo_workspace) -> None:
    settings, _ = demo_workspace
    from training.backtest import latest_cutoff

    cutoff = latest_cutoff(settings, "value").isoformat()
    result = invoke(env, "backtest", "value", "--cutoff", cutoff, "--no-tune", "--json")
    assert result.exit_code == 0, result.output
    metrics = last_json(result.stdout)
    assert list(metrics) == ["model", "last_period", "bg_nbd"]
    bounded = last_json(invoke(env, "backtest", "value", "--cutoff", cutoff, "--no-tune", "--json",
                               REPURCHASE__TRAINING__MAX_BACKTEST_ROWS="300").stdout)
    assert bounded["model"]["rows"] <= 300 < metrics["model"]["rows"]  # judged on a sample of members
    assert metrics["model"]["rmse"] < metrics["last_period"]["rmse"]

    late = invoke(env, "backtest", "churn", "--cutoff", "2030-01-01")
    assert late.exit_code == 2 and "label window ends after the data" in late.output
    unknown = invoke(env, "backtest", "loyalty", "--cutoff", cutoff)
    assert unknown.exit_code == 2 and "unknown model 'loyalty'" in unknown.output
    orphan = invoke(env, "backtest", "churn", "--cutoff", cutoff, "--mapping", "cdnow")
    assert orphan.exit_code == 2 and "only used with --data" in orphan.output


@pytest.mark.realdata
def test_cdnow_backtest_from_a_file(env: dict[str, str], shared_data: Path) -> None:
    """The issue's CDNOW task: features to 1997-12-31, label = buys again in the next 181 days."""
    path = shared_data / "cdnow" / "CDNOW_master.txt"
    result = invoke(env, "backtest", "churn", "--cutoff", "1998-01-01", "--horizon", "181", "--data", str(path),
                    "--mapping", "cdnow", "--json", REPURCHASE__TRAINING__TUNING__TRIALS="4")
    assert result.exit_code == 0, result.output
    metrics = last_json(result.stdout)
    assert list(metrics)[:3] == ["model", "rfm_rule", "bg_nbd"]
    assert metrics["model"]["rows"] == 23_570
    assert metrics["model"]["observed_rate"] == pytest.approx(1 - 0.2280, abs=5e-4)  # 22.8% buy again
    assert metrics["bg_nbd"]["auc"] == pytest.approx(0.788, abs=0.006)  # the published BG/NBD figure
    assert metrics["model"]["auc"] > metrics["bg_nbd"]["auc"]
