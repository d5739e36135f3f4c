"""Crash-safe checkpoints: `accelerator.save_state` into a temporary folder, then one rename.

A checkpoint is `checkpoints/step-00000100/`. It is written as `checkpoints/.partial-step-...`
and renamed only once every process has finished writing, so a run killed mid-save leaves
the previous checkpoints untouched and `latest` never resolves to a half-written one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_NAME = re.compile(r"^step-(\d{8})$")


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


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int) -> Path:
    """Save the full training state for `step`; keep the newest `keep` checkpoints."""
    final = root / f"step-{step:08d}"
    partial = root / f".partial-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
