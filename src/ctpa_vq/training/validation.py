"""Validation on whole volumes (patch-wise, through the real pipeline) and model export."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.patch_dataset import VolumeStore
from ..evaluation import score_volume
from ..models import VQGAN3D
from ..pipelines import CTPAReconstructionPipeline
from ..visualize import save_mid_slices
from .config import TrainConfig


@torch.no_grad()
def validate(model: VQGAN3D, volumes: VolumeStore, config: TrainConfig, sample_dir: Path, step: int) -> dict:
    """PSNR/SSIM in HU over the model's window, codebook use and clipping, on whole volumes.

    Writes mid-slices (input | reconstruction | error) of the first volume to
    `sample_dir/step-XXXXXXXX.png`.
    """
    pipeline = CTPAReconstructionPipeline(vqgan=model)  # puts the model in eval mode
    pipeline.set_progress_bar_config(disable=True)
    limit = config.training.val_max_volumes or len(volumes)
    scores = []
    counts = torch.zeros(model.quantizer.num_codes, dtype=torch.float64)
    for index in range(min(limit, len(volumes))):
        hu = volumes.volume(index)
        score, result = score_volume(
            pipeline,
            hu,
            volumes.patient_ids[index],
            patch_size=config.training.val_patch_size or config.dataset.patch_size,
            overlap=config.training.val_overlap,
            blend=config.training.val_blend,
            batch_size=config.training.val_batch_size,
        )
        scores.append(score)
        counts += torch.bincount(result.indices.flatten().cpu(), minlength=counts.numel()).double()
        if index == 0:
            sample_dir.mkdir(parents=True, exist_ok=True)
            save_mid_slices(sample_dir / f"step-{step:08d}.png", hu, result.reconstruction, pipeline.window)
    probs = counts / counts.sum()
    perplexity = float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))
    return {
        "val_psnr": float(np.mean([s.psnr for s in scores])),
        "val_ssim": float(np.mean([s.ssim for s in scores])),
        "val_perplexity": perplexity,
        "val_codebook_usage": float((counts > 0).double().mean()),
        "val_clipped_fraction": float(np.mean([s.clipped_fraction for s in scores])),
    }


def export_model(model: VQGAN3D, target: Path, run_dir: Path) -> None:
    """Save the pipeline (model under `vqgan/`) plus the recipe and metrics; replace `target` atomically."""
    partial = target.with_name(f".partial-{target.name}")
    shutil.rmtree(partial, ignore_errors=True)
    CTPAReconstructionPipeline(vqgan=model).save_pretrained(partial)
    for name in ("config.yaml", "metrics.csv"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, partial / name)
    previous = target.with_name(f".previous-{target.name}")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    partial.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
