"""The CLI: commands parse, report in JSON, and fail with a clear message and exit code 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()


def invoke(home: Path, *args: str):
    return runner.invoke(app, list(args), env={"REPURCHASE_HOME": str(home), "COLUMNS": "200"})


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_help_lists_every_command(tmp_path: Path):
    result = invoke(tmp_path, "--help")
    assert result.exit_code == 0
    for command in ("demo", "demo-data", "ingest", "features", "segments", "settings"):
        assert command in result.output


def test_settings_json_reflects_the_environment(tmp_path: Path):
    result = runner.invoke(app, ["settings", "--json"],
                           env={"REPURCHASE_HOME": str(tmp_path), "REPURCHASE__LIFECYCLE__DORMANT_DAYS": "60"})
    assert result.exit_code == 0, result.output
    payload = last_json(result.output)
    assert payload["lifecycle"]["dormant_days"] == 60
    assert payload["paths"]["home"] == str(tmp_path)


def test_bad_settings_key_is_a_clear_error(tmp_path: Path):
    result = runner.invoke(app, ["settings"], env={"REPURCHASE__NOPE": "1", "REPURCHASE_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert "nope: Extra inputs are not permitted" in result.output


def test_ingest_of_an_empty_file_names_the_file(tmp_path: Path):
    empty = tmp_path / "tx.csv"
    empty.write_text("")
    result = invoke(tmp_path / "home", "ingest", "--transactions", str(empty), "--mapping", "cdnow")
    assert result.exit_code == 2
    assert "tx.csv" in result.output and "empty" in result.output


def test_ingest_needs_something_to_read(tmp_path: Path):
    result = invoke(tmp_path, "ingest")
    assert result.exit_code == 2
    assert "nothing to ingest" in result.output


def test_bad_date_option_names_the_option(tmp_path: Path):
    result = invoke(tmp_path, "features", "build", "--as-of", "2024-13-01")
    assert result.exit_code == 2
    assert "--as-of: '2024-13-01' is not a date" in result.output


def test_segments_before_any_features_says_what_to_run(tmp_path: Path):
    result = invoke(tmp_path, "segments")
    assert result.exit_code == 2
    assert "repurchase features build" in result.output


@pytest.mark.slow
def test_demo_data_ingest_features_and_segments(tmp_path: Path):
    home = tmp_path / "home"
    gen = invoke(home, "demo-data", "--members", "800", "--json")
    assert gen.exit_code == 0, gen.output
    assert last_json(gen.output)["members"] == 800
    ing = invoke(home, "ingest", "--raw", str(home / "raw" / "demo"), "--mapping", "demo", "--json")
    assert ing.exit_code == 0, ing.output
    rep = last_json(ing.output)
    assert rep["reconciles"] is True
    assert rep["tables"]["transactions"]["read"] == last_json(gen.output)["lines"]
    built = invoke(home, "features", "build", "--as-of", "2024-06-01", "--as-of", "2024-12-31", "--json")
    assert built.exit_code == 0, built.output
    assert last_json(built.output)["snapshots"] == 2
    seg = invoke(home, "segments", "--as-of", "2024-12-31", "--compare", "2024-06-01", "--json")
    assert seg.exit_code == 0, seg.output
    payload = last_json(seg.output)
    assert sum(r["members"] for r in payload["stages"]) == payload["members"]
    assert sum(r["members"] for r in payload["segments"]) == payload["members"]
    assert sum(map(sum, payload["transitions"]["counts"])) == payload["members"]  # nobody leaves


@pytest.mark.realdata
@pytest.mark.slow
def test_backtest_data_ingest_of_cdnow_reconciles(tmp_path: Path, shared_data: Path):
    result = invoke(tmp_path, "ingest", "--transactions", str(shared_data / "cdnow" / "CDNOW_master.txt"),
                    "--mapping", "cdnow", "--json")
    assert result.exit_code == 0, result.output
    rep = last_json(result.output)
    t = rep["tables"]["transactions"]
    assert t["read"] == 69_659 and t["read"] == t["accepted"] + t["rejected"]
    assert rep["tables"]["members"]["written"] == 23_570


def test_demo_data_defaults_to_the_settings_size(tmp_path: Path):
    result = runner.invoke(app, ["demo-data", "--json"],
                           env={"REPURCHASE_HOME": str(tmp_path), "REPURCHASE__DEMO__MEMBERS": "150"})
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["members"] == 150
    assert invoke(tmp_path, "demo-data", "--members", "0").exit_code == 2  # below the minimum


@pytest.mark.slow
def test_campaigns_uplift_is_logged_to_mlflow(demo_workspace, tmp_path: Path):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    settings, _ = demo_workspace
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = runner.invoke(app, ["campaigns", "uplift", "--window", "7", "--folds", "3", "--json"],
                           env={"REPURCHASE_HOME": str(settings.dirs.home), "COLUMNS": "200",
                                "REPURCHASE__MLFLOW__TRACKING_URI": uri,
                                "REPURCHASE__MLFLOW__ARTIFACT_ROOT": str(tmp_path / "artifacts")})
    assert result.exit_code == 0, result.output
    rep = last_json(result.output)
    mlc = MlflowClient(uri)
    run = mlc.get_run(rep["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "uplift"
    assert run.data.metrics["qini"] == pytest.approx(rep["qini"])
    assert run.data.metrics["uplift_at_0.2"] == pytest.approx(rep["uplift_at"]["0.2"])
    assert run.data.params == {"window_days": "7", "folds": "3", "model": "t-learner"}
    scores = pd.read_parquet(mlc.download_artifacts(rep["run_id"], "uplift_scores.parquet", str(tmp_path)))
    assert len(scores) == rep["rows"] and scores["uplift_score"].notna().all()
    assert json.loads((Path(mlc.download_artifacts(rep["run_id"], "uplift.json", str(tmp_path)))).read_text())[
        "qini"] == pytest.approx(rep["qini"])


def test_features_apply_reports_what_it_registered(tmp_path: Path):
    result = invoke(tmp_path / "home", "features", "apply", "--json")
    assert result.exit_code == 0, result.output
    rep = last_json(result.output)
    assert rep["profile"] == "embedded" and "member_scores" in rep["feature_views"]
    assert "scores_v1" in rep["feature_services"] and "serving_v1" in rep["feature_services"]
