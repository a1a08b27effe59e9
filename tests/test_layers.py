"""Imports flow one way (DESIGN.md): pipelines -> serving, training, features; serving -> features, training;
training -> features; features -> nothing of ours. Nothing happens at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "features": {"features"},
    "training": {"features", "training"},
    "serving": {"features", "training", "serving"},
    "pipelines": {"features", "training", "serving", "pipelines"},
}


def _our_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in ALLOWED}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str):
    bad = {str(p.relative_to(ROOT)): sorted(_our_imports(p) - ALLOWED[package])
           for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_importing_the_packages_creates_nothing(tmp_path: Path):
    code = "import features.settings, features.contract, features.lake, pipelines.cli, training.labels"
    before = sorted(p.name for p in ROOT.iterdir())
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert sorted(p.name for p in ROOT.iterdir()) == before
    assert list(tmp_path.iterdir()) == []
