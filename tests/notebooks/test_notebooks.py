"""Every notebook runs top to bottom on small data, with its parameters cell overridden."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run_notebook(path: Path, tmp_path: Path, **params: object) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert cells, f"{path.name} has no cell tagged 'parameters'"
    cells[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_explore_demo_runs_and_shows_the_planted_cycles(tmp_path: Path):
    nb = run_notebook(NOTEBOOKS / "explore_demo.ipynb", tmp_path, MEMBERS=1500, HOME=str(tmp_path / "home"))
    text = _outputs(nb)
    assert "planted cycle (days)" in text
    assert "Champions" in text and "churned" in text
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
