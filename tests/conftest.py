"""Shared fixtures: settings rooted in a temporary folder, the real data folder, a small demo workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
