"""Crash-safe checkpoints: `accelerator.save_state` into a temporary folder, fsync, one rename.

A checkpoint is `checkpoints/step-00000100/`. It is written as `checkpoints/.partial-step-...`,
flushed to disk (every file and folder), and renamed only once every process has finished
writing, so a run killed mid-save (or a node that loses power) leaves the previous checkpoints
untouched and `latest` never resolves to a half-written one.

Pruning keeps the newest `keep` (>= 1) checkpoints, and never deletes the one the run resumed
from: resuming from an older checkpoint to branch off must not destroy it.

`CTPA_VQ_TEST_SLEEP_IN_SAVE=SECONDS[@STEP]` makes the save (of step STEP only, if given) sleep
after its files are written and before the rename: the tests use it to kill a run in that window.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from accelerate import Accelerator

from ..utils.atomic import fsync_dir, partial_folder, replace_folder

_NAME = re.compile(r"^step-(\d{8})$")
SLEEP_IN_SAVE_ENV = "CTPA_VQ_TEST_SLEEP_IN_SAVE"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_checkpoint(root: Path, resume: str | None) -> Path | None:
    """`None` -> no resume; `"latest"` -> newest complete checkpoint (None if there is none); else a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no model.safetensors)")
    return path


def save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, keep: int, protected: Path | None = None
) -> Path:
    """Save the full training state for `step`; keep the newest `keep` checkpoints and `protected`."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written), got {keep}")
    final = root / f"step-{step:08d}"
    partial = partial_folder(final)  # every process writes its part, so not `atomic_folder`
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _sleep_for_tests(step)
        replace_folder(partial, final)
        keep_also = protected.resolve() if protected is not None else None
        for old in checkpoint_dirs(root)[:-keep]:
            if old.resolve() != keep_also:
                shutil.rmtree(old)
        fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def _sleep_for_tests(step: int) -> None:
    seconds, _, only_step = os.environ.get(SLEEP_IN_SAVE_ENV, "").partition("@")
    if seconds and (not only_step or int(only_step) == step):
        time.sleep(float(seconds))
