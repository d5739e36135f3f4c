"""Checkpoint and export durability (fsync before rename), pruning, and metrics.csv on resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from ctpa_vq import VQGAN3D
from ctpa_vq.training.checkpoints import checkpoint_dirs, save_checkpoint
from ctpa_vq.training.metrics_log import MetricsLogger
from ctpa_vq.training.export import export_model


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """("fsync", path) and ("rename", source) in the order they happen."""
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, Path.rename

    def recording_fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_rename(self, target):
        events.append(("rename", os.path.realpath(self)))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "rename", recording_rename)
    return events


def _assert_flushed_before_rename(events, partial: Path, files: list[Path]) -> None:
    renamed_at = events.index(("rename", os.path.realpath(partial)))
    flushed = {path for kind, path in events[:renamed_at] if kind == "fsync"}
    missing = [str(f) for f in files if os.path.realpath(partial / f) not in flushed]
    assert not missing, f"written but not fsynced before the rename: {missing}"
    assert os.path.realpath(partial) in flushed, "the folder itself was not fsynced"
    assert ("fsync", os.path.realpath(partial.parent)) in events[renamed_at:], "the rename was not fsynced"


def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(tmp_path, disk_events):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(3, 2), torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1))
    root = tmp_path / "checkpoints"
    final = save_checkpoint(accelerator, root, 5, keep=2)
    files = [p.relative_to(final) for p in final.rglob("*") if p.is_file()]
    assert len(files) >= 2
    _assert_flushed_before_rename(disk_events, root / ".partial-step-00000005", files)


def test_exported_model_is_fsynced_before_the_rename(tmp_path, disk_events):
    export_model(VQGAN3D.from_preset("tiny"), tmp_path / "final", tmp_path)
    files = [p.relative_to(tmp_path / "final") for p in (tmp_path / "final").rglob("*") if p.is_file()]
    assert any(f.name.endswith(".safetensors") for f in files)
    _assert_flushed_before_rename(disk_events, tmp_path / ".partial-final", files)


def test_pruning_keeps_the_newest_and_never_the_checkpoint_a_run_resumed_from(tmp_path):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(3, 2))
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save_checkpoint(accelerator, root, step, keep=3)
    # Resumed from step 2 (an older one) and saving its own step 4 and 6 with keep=1.
    save_checkpoint(accelerator, root, 4, keep=1, protected=root / "step-00000002")
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000002", "step-00000006"]
    save_checkpoint(accelerator, root, 6, keep=1, protected=root / "step-00000002")
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000002", "step-00000006"]
    save_checkpoint(accelerator, root, 8, keep=1)
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000008"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save_checkpoint(accelerator, root, 10, keep=0)


def test_a_resumed_run_drops_the_metric_rows_written_after_its_checkpoint(tmp_path):
    accelerator = Accelerator(cpu=True)
    path = tmp_path / "metrics.csv"
    first = MetricsLogger(accelerator, path)
    for step in range(1, 6):
        first.log(step, {"loss": 1.0 / step})
    first.log(3, {"val_psnr": 20.0})
    resumed = MetricsLogger(accelerator, path, start_step=3)  # the checkpoint was at step 3
    resumed.log(4, {"loss": 0.5})
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["val_psnr"]) for r in rows] == [
        ("1", "1.0", ""), ("2", "0.5", ""), ("3", str(1 / 3), ""), ("3", "", "20.0"), ("4", "0.5", ""),
    ]  # fmt: skip
    MetricsLogger(accelerator, path)  # a fresh run in the same folder starts a fresh file
    with path.open() as f:
        assert list(csv.DictReader(f)) == []
