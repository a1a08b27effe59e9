from pathlib import Path

import pytest

from features.lake import atomic_path


def test_atomic_path_replaces_a_directory_in_one_step(tmp_path: Path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # untouched until the block succeeds
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporaries left behind


def test_atomic_path_keeps_the_old_file_on_error(tmp_path: Path):
    target = tmp_path / "f.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
