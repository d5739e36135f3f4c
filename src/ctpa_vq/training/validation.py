"""Validation on whole volumes (patch-wise, through the real pipeline), shared out across processes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..data.patch_dataset import VolumeStore
from ..evaluation.scoring import VolumeScore, score_volume
from ..evaluation.visualize import save_mid_slices
from ..models import VQGAN3D
from ..pipelines import CTPAReconstructionPipeline
from .config import TrainConfig


SCORE_FIELDS = tuple(name for name in VolumeScore.__dataclass_fields__ if name != "name")
"""The per-volume figures validation averages into `val_<field>` (whole-volume, body and per-region)."""


def mid_slices_path(sample_dir: Path, step: int) -> Path:
    """The PNG in which `validate` at `step` shows volume 0: input | reconstruction | error mid-slices."""
    return sample_dir / f"step-{step:08d}.png"


@torch.no_grad()
def validate(
    model: VQGAN3D, volumes: VolumeStore, config: TrainConfig, sample_dir: Path, step: int, accelerator: Accelerator
) -> dict:
    """`evaluate`'s figures (whole-volume and body PSNR/SSIM in HU, per-region HU error, clipping) and codebook use, on whole volumes.

    The first `training.val_max_volumes` volumes are shared out across processes (volume `i` on
    process `i % world_size`) and the per-volume scores and code counts gathered, so every
    process returns the same figures as one process scoring them all. Process 0 writes
    mid-slices (input | reconstruction | error) of volume 0 to `mid_slices_path(sample_dir, step)`.
    """
    pipeline = CTPAReconstructionPipeline(vqgan=model)  # runs the model in eval mode, then gives train mode back
    pipeline.set_progress_bar_config(disable=True)
    limit = min(config.training.val_max_volumes or len(volumes), len(volumes))
    scores = []
    counts = torch.zeros(model.quantizer.num_codes, dtype=torch.float64)
    for index in range(accelerator.process_index, limit, accelerator.num_processes):
        hu = volumes.volume(index)
        score, result = score_volume(
            pipeline,
            hu,
            volumes.patient_ids[index],
            patch_size=config.training.val_patch_size,
            overlap=config.training.val_overlap,
            blend=config.training.val_blend,
            batch_size=config.training.val_batch_size,
            max_patch_voxels=config.training.val_max_patch_voxels,
        )
        scores.append((index, score))
        counts += torch.bincount(result.indices.flatten().cpu(), minlength=counts.numel()).double()
        if index == 0:
            sample_dir.mkdir(parents=True, exist_ok=True)
            save_mid_slices(mid_slices_path(sample_dir, step), hu, result.reconstruction, pipeline.window)
    # Sorted by volume: the means add in the same order whatever the world size.
    scores = [score for _, score in sorted(gather_object(scores) if accelerator.num_processes > 1 else scores,
                                           key=lambda item: item[0])]
    counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
    probs = counts / counts.sum()
    perplexity = float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a region absent from every volume stays NaN
        means = {f"val_{key}": float(np.nanmean([getattr(s, key) for s in scores])) for key in SCORE_FIELDS}
    return {**means, "val_perplexity": perplexity, "val_codebook_usage": float((counts > 0).double().mean())}
