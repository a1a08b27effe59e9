"""`repurchase serve` refuses to start without champion models, saying what to run."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pipelines.cli import app


def test_serve_without_champions_says_what_to_run(tmp_path: Path) -> None:
    env = {"REPURCHASE_HOME": str(tmp_path / "home"), "COLUMNS": "200",
           "REPURCHASE__MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "REPURCHASE__MLFLOW__ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    result = CliRunner().invoke(app, ["serve"], env=env)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "no churn@champion, next_purchase@champion, value@champion, recommend@champion" in text
    assert "repurchase train all" in text
