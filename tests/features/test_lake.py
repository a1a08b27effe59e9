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


def test_snapshot_dates_lists_only_written_snapshots(settings):
    from datetime import date

    from features.lake import MEMBER_VIEW, snapshot_dates, snapshot_dir, snapshot_path

    assert snapshot_dates(settings) == []
    for d in ("2024-02-01", "2024-01-01"):
        p = snapshot_path(settings, MEMBER_VIEW, d)
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
    (snapshot_dir(settings, MEMBER_VIEW) / "as_of=2024-03-01").mkdir()  # nothing written there
    (snapshot_dir(settings, MEMBER_VIEW) / ".as_of=2024-04-01.tmp-1").mkdir()
    assert snapshot_dates(settings) == [date(2024, 1, 1), date(2024, 2, 1)]
