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
