"""Shared fixtures: settings rooted in a temporary folder, the real data folder, a small demo workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def server_up(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (Redis 6379, PostgreSQL 5432): tests that need it skip otherwise."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def make_settings(home: Path, **overrides) -> Settings:
    """Settings rooted at ``home``, ignoring the caller's REPURCHASE_* environment."""
    paths = {"home": str(home), **overrides.pop("paths", {})}
    return load_settings(environ={}, paths=paths, **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict]:
    """The main job run once on a small demo: lake, feature history, Feast registry and online store."""
    from pipelines.demo import run_demo

    s = make_settings(tmp_path_factory.mktemp("demo") / "home")
    report = run_demo(s, members=1200)
    return s, report


@pytest.fixture(scope="session")
def trained_workspace(demo_workspace, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict]:
    """The demo workspace with every model trained (tuning off) and promoted, in its own MLflow: (settings,
    the environment for `repurchase` subprocesses). The serving tests and the daily run share it."""
    import os
    import subprocess
    import sys

    settings, _ = demo_workspace
    tmp = tmp_path_factory.mktemp("trained-mlflow")
    env = {**os.environ, "REPURCHASE_HOME": str(settings.dirs.home),
           "REPURCHASE__MLFLOW__TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "REPURCHASE__MLFLOW__ARTIFACT_ROOT": str(tmp / "artifacts"),
           "REPURCHASE__TRAINING__TUNING__TRIALS": "0", "REPURCHASE__RECOMMEND__TRIALS": "0",
           "REPURCHASE__TRAINING__NUM_THREADS": "1", "COLUMNS": "200"}
    cli = [sys.executable, "-m", "pipelines.cli"]
    for args in (["train", "all"], *[["models", "promote", m] for m in ("churn", "next-purchase", "value",
                                                                           "recommend")]):
        subprocess.run([*cli, *args], env=env, cwd=REPO, check=True, capture_output=True, timeout=900)
    return settings, env
