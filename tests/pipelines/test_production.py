"""The production profile from settings alone: Feast's online store on the real Redis, its SQL registry and
MLflow's tracking store on the real PostgreSQL (127.0.0.1), every command unchanged. The same demo data gives
the same online features and the same scores as the embedded profile (SQLite, local files).

Each run gets its own PostgreSQL databases and Feast project (Redis keys end with the project), dropped and
deleted afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.contract import C
from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_path
from tests.conftest import REPO, server_up

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as con:
        con.execute(sql)


def cli(env: dict[str, str], *args: str, timeout: int = 900) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args, "--json"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, f"repurchase {' '.join(args)}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def production(trained_workspace, tmp_path_factory) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """The trained demo's lake and snapshots in a new home, run through the production profile: (production
    env, embedded env). The embedded side is a copy of the trained workspace (its models, a copy of its
    MLflow database), applied, materialized and scored again in its own home; the production side runs
    every command itself on the same files."""
    if not server_up(6379):
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    if not server_up(5432):
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    settings, trained = trained_workspace
    tag = f"rp_{uuid.uuid4().hex[:10]}"
    root = tmp_path_factory.mktemp("production")
    base = {k: v for k, v in os.environ.items() if not k.startswith("REPURCHASE")}
    base |= {"REPURCHASE__TRAINING__TUNING__TRIALS": "0", "REPURCHASE__RECOMMEND__TRIALS": "0",
             "REPURCHASE__TRAINING__NUM_THREADS": "1", "COLUMNS": "200"}
    homes = {}
    for name in ("production", "embedded"):
        homes[name] = root / name
        # the snapshots `train all` computed for its cutoffs go with the lake, so both profiles train on the
        # same files: DuckDB's parallel SUM of doubles can differ in the last bit between two runs
        # (docs/status.md), which would make the value models differ, not the profiles
        shutil.copytree(settings.dirs.home, homes[name], ignore=shutil.ignore_patterns("outputs", "feast"))
    trained_db = Path(trained["REPURCHASE__MLFLOW__TRACKING_URI"].removeprefix("sqlite:///"))
    shutil.copy2(trained_db, root / "mlflow.db")
    prod = {**base, "REPURCHASE_HOME": str(homes["production"]), "REPURCHASE_PROFILE": "production",
            "REPURCHASE__FEAST__PROJECT": tag, "REPURCHASE__FEAST__REGISTRY_URL": f"{PG}/{tag}_feast",
            "REPURCHASE__MLFLOW__PRODUCTION_TRACKING_URI": f"{PG}/{tag}_mlflow",
            "REPURCHASE__MLFLOW__ARTIFACT_ROOT": str(root / "prod-artifacts")}
    emb = {**base, "REPURCHASE_HOME": str(homes["embedded"]),
           "REPURCHASE__MLFLOW__TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "REPURCHASE__MLFLOW__ARTIFACT_ROOT": trained["REPURCHASE__MLFLOW__ARTIFACT_ROOT"]}
    for db in ("feast", "mlflow"):
        _admin(f"CREATE DATABASE {tag}_{db}")
    try:
        trains = (["train", "all"], *[["models", "promote", m] for m in ("churn", "next-purchase", "value",
                                                                         "recommend")])
        for env, steps in ((emb, ()), (prod, trains)):
            for args in (["features", "apply"], ["features", "materialize"], *steps, ["score"]):
                cli(env, *args)
        yield prod, emb
    finally:
        _cleanup_redis(tag)
        for db in ("feast", "mlflow"):
            _admin(f"DROP DATABASE IF EXISTS {tag}_{db} WITH (FORCE)")


def _cleanup_redis(project: str) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    keys = list(client.scan_iter(match=b"*" + project.encode()))
    if keys:
        client.delete(*keys)


def _settings(env: dict[str, str]):
    from features.settings import load_settings

    return load_settings(environ=env)


def test_the_profiles_use_redis_and_postgres(production) -> None:
    import redis

    from features.store import feature_store

    prod, _ = production
    s = _settings(prod)
    store = feature_store(s)
    assert store.config.online_store.type == "redis" and store.config.registry.registry_type == "sql"
    assert s.tracking_uri.startswith(PG)
    keys = list(redis.Redis(host="127.0.0.1", port=6379).scan_iter(match=b"*" + s.feast.project.encode()))
    members = len(pd.read_parquet(snapshot_path(s, MEMBER_VIEW, snapshot_dates(s)[-1].isoformat())))
    assert len(keys) >= members  # one hash per member (the scores share it) and per item
    from mlflow.tracking import MlflowClient

    mlc = MlflowClient(s.tracking_uri, registry_uri=s.tracking_uri)
    assert str(mlc.get_model_version_by_alias("churn", "champion").version) == "1"  # an int from PostgreSQL
    runs = mlc.search_runs([mlc.get_experiment_by_name("repurchase").experiment_id], max_results=500)
    assert "scoring" in {r.data.tags.get("kind") for r in runs}
    assert {r.data.params.get("kind") for r in runs} >= {"churn", "value", "recommend"}


def test_the_same_online_features_from_redis_and_sqlite(production) -> None:
    from features.store import online_features

    prod, emb = production
    a, b = _settings(prod), _settings(emb)
    ids = pd.read_parquet(snapshot_path(a, MEMBER_VIEW, snapshot_dates(a)[-1].isoformat()))[C.MEMBER_ID].tolist()
    x = online_features(a, [*ids, "NOT-A-MEMBER"], now=pd.Timestamp("2030-01-01", tz="UTC"))
    y = online_features(b, [*ids, "NOT-A-MEMBER"], now=pd.Timestamp("2030-01-01", tz="UTC"))
    assert list(x.columns) == list(y.columns) and len(x) == len(ids) + 1
    for c in x.columns:
        if x[c].dtype.kind == "f":
            np.testing.assert_allclose(x[c].to_numpy(), y[c].to_numpy(), rtol=1e-9, atol=0, equal_nan=True)
        else:
            assert x[c].tolist() == y[c].tolist(), c
    assert x[C.FEATURE_TS].iloc[-1] is pd.NaT or pd.isna(x[C.FEATURE_TS].iloc[-1])


def test_the_same_scores_on_both_profiles(production) -> None:
    from features.definitions import SCORES_SERVICE
    from features.store import online_features
    from training.scores import latest_scores, score_dates

    prod, emb = production
    a, b = _settings(prod), _settings(emb)
    day = score_dates(a)[-1]
    assert score_dates(b)[-1] == day
    part = {name: s.dirs.outputs / "scores" / f"as_of={day}" for name, s in (("prod", a), ("emb", b))}
    for f in ("members.parquet", "recommendations.parquet", "online.parquet"):
        x, y = pd.read_parquet(part["prod"] / f), pd.read_parquet(part["emb"] / f)
        if f == "online.parquet":  # the versions are each registry's: both 1 here, so equal too
            assert (x["scored_by"] == y["scored_by"]).all()
        pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-9)
    manifest = json.loads((part["prod"] / "manifest.json").read_text())
    assert manifest["versions"] == json.loads((part["emb"] / "manifest.json").read_text())["versions"]
    assert latest_scores(a, manifest["versions"], day) is not None
    # and the scores came back from Redis as from SQLite
    ids = pd.read_parquet(part["prod"] / "members.parquet")[C.MEMBER_ID].tolist()[:50]
    x, y = online_features(a, ids, SCORES_SERVICE), online_features(b, ids, SCORES_SERVICE)
    assert x["churn_probability"].tolist() == y["churn_probability"].tolist()
    assert x["recommended_items"].tolist() == y["recommended_items"].tolist()
    assert (x["churn_probability"].notna()).all()
