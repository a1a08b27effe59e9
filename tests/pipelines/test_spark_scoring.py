"""Batch scoring on Spark (pandas UDFs over partitions, local mode) gives the DuckDB path's scores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.skipif(
    shutil.which("java") is None, reason="Spark needs java on PATH (Java 17)")]


def _score(env: dict, engine: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "score", "--json"], cwd=REPO, text=True,
                          capture_output=True, timeout=900, env={**env, "REPURCHASE__FEATURES__ENGINE": engine})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_spark_scores_every_member_as_the_duckdb_path_does(trained_workspace, tmp_path: Path) -> None:
    settings, env = trained_workspace
    home = tmp_path / "home"
    shutil.copytree(settings.dirs.home, home, ignore=shutil.ignore_patterns("outputs"))
    env = {**env, "REPURCHASE_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "pipelines.cli", "features", "apply"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)  # the copy's Feast sources point at the copy

    duck = _score(env, "duckdb")
    part = Path(duck["path"])
    a_members, a_recs = (pd.read_parquet(part / f) for f in ("members.parquet", "recommendations.parquet"))
    spark = _score(env, "spark")
    assert spark["path"] == duck["path"] and spark["engine"] == "spark" and duck["engine"] == "duckdb"
    assert spark["versions"] == duck["versions"] and spark["members"] == duck["members"] == len(a_members)
    assert spark["online"] == duck["online"]
    b_members, b_recs = (pd.read_parquet(part / f) for f in ("members.parquet", "recommendations.parquet"))

    assert list(b_members.columns) == list(a_members.columns)
    assert list(b_members["member_id"]) == list(a_members["member_id"])
    for c in a_members.columns:
        if a_members[c].dtype.kind == "f":
            pd.testing.assert_series_equal(b_members[c], a_members[c], rtol=1e-12, atol=0, check_names=True)
        elif c == "churn_reasons":
            assert [list(v) for v in b_members[c]] == [list(v) for v in a_members[c]]
        else:
            assert b_members[c].tolist() == a_members[c].tolist(), c
    assert (a_members["churn_reasons"].map(len) > 0).any()  # reasons were compared, not only empty lists
    # ALS scores are float32 dot products summed in another order in another batch: items and ranks equal
    assert len(b_recs) == len(a_recs) == 20 * len(a_members)
    keys = ["member_id", "rank", "item_id", "source", "reason", "cold_start"]
    assert b_recs[keys].equals(a_recs[keys])
    pd.testing.assert_series_equal(b_recs["score"], a_recs["score"], rtol=1e-4, atol=1e-6)
