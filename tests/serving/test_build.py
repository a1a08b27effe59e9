"""The service image's build: `bentoml build` from pyproject's [tool.bentoml.build] makes a Bento with the code,
the settings and the locked requirements (containerizing it needs docker, which CI does not have)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def _uv() -> str:
    found = shutil.which("uv")
    if found is None:
        pytest.skip("uv is not on PATH")
    return found


def test_requirements_are_the_lock_files_export(tmp_path: Path) -> None:
    out = tmp_path / "requirements.txt"
    subprocess.run([_uv(), "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header",
                    "-o", str(out)], cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (REPO / "serving" / "requirements.txt").read_text() == out.read_text(), (
        "serving/requirements.txt is out of step with uv.lock: run the `uv export` line of docs/deployment.md")


@pytest.mark.slow
def test_bentoml_build_makes_a_bento_with_code_settings_and_requirements(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    bentos = list((tmp_path / "bentoml" / "bentos" / "repurchase").glob("*/bento.yaml"))
    assert len(bentos) == 1
    root = bentos[0].parent
    meta = yaml.safe_load(bentos[0].read_text())
    assert meta["service"] == "serving.service:Repurchase" and meta["name"] == "repurchase"
    for f in ("serving/service.py", "features/settings.yaml", "features/definitions.py", "training/scores.py",
              "pipelines/cli.py"):
        assert (root / "src" / f).is_file(), f
    assert not list((root / "src").rglob("test_*.py"))
    reqs = (root / "env" / "python" / "requirements.txt").read_text()
    for pin in ("bentoml==1.4.39", "feast==0.67.0", "lightgbm==4.7.0", "implicit==0.7.3", "mlflow==3.17.2"):
        assert pin in reqs, pin
    assert (root / "env" / "docker" / "Dockerfile").is_file()
