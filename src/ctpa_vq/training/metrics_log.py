"""Rank-0 metrics: one wide `metrics.csv` (appended across resumes) and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

from accelerate import Accelerator

COLUMNS = (
    "step", "epoch", "lr", "loss", "l1", "commitment", "perplexity", "codebook_usage",
    "perceptual", "g_adversarial", "feature_matching", "d_loss", "patches_per_s",
    "val_psnr", "val_ssim", "val_perplexity", "val_codebook_usage", "val_clipped_fraction",
)  # fmt: skip


class MetricsLogger:
    """Writes metric rows to `metrics.csv` and to the Accelerate trackers (TensorBoard), main process only."""

    def __init__(self, accelerator: Accelerator, path: Path):
        self.accelerator = accelerator
        self.path = path
        if accelerator.is_main_process and not path.exists():
            with path.open("w", newline="") as f:
                csv.DictWriter(f, COLUMNS).writeheader()

    def log(self, step: int, values: dict[str, float]) -> None:
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise KeyError(f"metrics not in metrics.csv's columns: {sorted(unknown)}")
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, COLUMNS, restval="").writerow({"step": step, **values})
