"""Atomic folder writes: a reader sees the old folder or the new one, never a half-written one."""

from __future__ import annotations

import pytest

from ctpa_vq.utils.atomic import atomic_folder


def test_a_finished_folder_replaces_the_old_one_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as partial:
        assert not target.joinpath("new.txt").exists()
        partial.mkdir()
        (partial / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # untouched while the new one is written
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_failed_write_keeps_the_old_folder_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target) as partial:
            partial.mkdir()
            (partial / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_the_leftover_of_a_killed_write_is_cleared_before_writing(tmp_path):
    target = tmp_path / "sub" / "final"
    stale = tmp_path / "sub" / ".partial-final"  # what a write killed before its rename leaves
    stale.mkdir(parents=True)
    (stale / "half.safetensors").write_bytes(b"half")
    with atomic_folder(target) as partial:
        assert not partial.exists()
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"x")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["final"]
