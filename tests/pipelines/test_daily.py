"""The daily run on a copy of the trained demo workspace: every step, the same outputs twice for the same
date, a run killed midway leaving the last good outputs as they were, a failed step named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


TIMES = {"created_at", "seconds", "finished_at"}  # what may differ between two runs: when and how long


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every output file; of a manifest, without its timestamps and timings. The run manifests
    (one per attempt) are left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "runs" not in p.relative_to(root).parts:
            data = p.read_bytes()
            if p.name == "manifest.json":
                kept = {k: v for k, v in json.loads(data).items() if k not in TIMES}
                data = json.dumps(kept, sort_keys=True).encode()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def daily_home(trained_workspace, tmp_path_factory):
    settings, env = trained_workspace
    home = tmp_path_factory.mktemp("daily") / "home"
    shutil.copytree(settings.dirs.home, home, ignore=shutil.ignore_patterns("outputs"))
    return home, {**env, "REPURCHASE_HOME": str(home)}


def _run(env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "run-daily", *args, "--json"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_two_runs_for_a_date_write_the_same_outputs(daily_home) -> None:
    home, env = daily_home
    first = _run(env)
    assert first.returncode == 0, first.stderr[-3000:]
    rep = json.loads(first.stdout.strip().splitlines()[-1])
    assert rep["status"] == "done" and [s for s, v in rep["steps"].items() if v["status"] == "done"] == \
        ["features", "feast", "online", "score", "lists", "dashboard"]
    assert rep["steps"]["ingest"]["status"] == "skipped"
    outputs = home / "outputs"
    before = _digests(outputs)
    assert any(k.startswith("scores/as_of=") for k in before) and any(k.endswith(".csv") for k in before)
    assert "dashboard/index.html" in before
    again = _run(env, "--date", rep["date"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _digests(outputs) == before


def test_a_run_killed_midway_leaves_the_last_good_outputs(daily_home) -> None:
    home, env = daily_home
    outputs = home / "outputs"
    before = _digests(outputs)
    assert before, "the previous test leaves a good run behind"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--log-level", "INFO", "run-daily"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    deadline = time.time() + 600
    for line in proc.stdout:  # kill it once scoring has begun: scores, lists and dashboard are mid-way
        if "step score" in line or time.time() > deadline:
            time.sleep(2.0)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    after = _digests(outputs)
    assert {k: v for k, v in after.items() if "/." not in f"/{k}"} == before  # leftovers are dot-temporaries only
    ok = _run(env)  # the next run completes and sweeps nothing it should keep
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _digests(outputs) == before


def test_a_failed_step_is_named_and_exits_non_zero(daily_home) -> None:
    home, env = daily_home
    bad = {**env, "REPURCHASE__SERVING__ALIAS": "no-such-alias"}  # scoring cannot find its models
    done = _run(bad)
    assert done.returncode == 1
    assert "step 'score' failed" in done.stderr and "no-such-alias" in done.stderr
    manifest = json.loads(next((home / "outputs" / "runs").glob("*/manifest.json")).read_text())
    assert manifest["status"] == "failed" and manifest["failed_step"] == "score"
