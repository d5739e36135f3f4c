"""Rank-0 metrics: one wide `metrics.csv` (one row set per step, across resumes) and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

from accelerate import Accelerator

from ..utils.atomic import atomic_path

COLUMNS = (
    "step", "epoch", "lr", "loss", "l1", "ssim_loss", "commitment", "perplexity", "codebook_usage",
    "perceptual", "g_adversarial", "feature_matching", "d_loss", "d_lr", "skipped_steps", "samples_seen", "patches_per_s",
    "val_psnr", "val_ssim", "val_body_psnr", "val_body_ssim", "val_mae_body", "val_mae_lung", "val_mae_soft_tissue",
    "val_mae_vessel", "val_mae_bone", "val_perplexity", "val_codebook_usage", "val_clipped_fraction",
)  # fmt: skip


class MetricsLogger:
    """Writes metric rows to `metrics.csv` and to the Accelerate trackers (TensorBoard), main process only.

    A run that starts at `start_step` (a resume, or 0) first drops the rows of later steps, which
    a killed run wrote after its last checkpoint and the resumed run is about to write again.
    """

    def __init__(self, accelerator: Accelerator, path: Path, start_step: int = 0):
        self.accelerator = accelerator
        self.path = path
        if accelerator.is_main_process:
            kept = []
            if path.exists():
                with path.open(newline="") as f:
                    kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
            with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)

    def log(self, step: int, values: dict[str, float]) -> None:
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise KeyError(f"metrics not in metrics.csv's columns: {sorted(unknown)}")
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, COLUMNS, restval="").writerow({"step": step, **values})
