"""Whole-volume evaluation: reconstruct each volume patch-wise and score it in HU.

Shared by `ctpa-vq evaluate` and the training loop's validation, so both report the same
numbers for the same model and grid.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .atomic import atomic_path
from .data.nifti import load_ct
from .data.patch_dataset import VolumeStore
from .data.prepare import find_nifti_files
from .intensity import clipped_fraction
from .metrics import reconstruction_metrics
from .pipelines import CTPAReconstructionOutput, CTPAReconstructionPipeline
from .regions import REGIONS


@dataclass
class VolumeScore:
    """One volume's reconstruction quality in HU over the model's window.

    ``psnr`` (dB) and ``ssim`` over the whole volume; ``body_psnr`` and ``body_ssim`` over the
    body mask; ``mae_*`` the mean absolute HU error over the body and per region (lung, soft
    tissue, contrast-enhanced vessel, bone; see :mod:`ctpa_vq.regions`; NaN where a region is
    empty); ``clipped_fraction`` of the voxels the window clips (lost before the model sees them).
    """

    name: str
    psnr: float
    ssim: float
    body_psnr: float
    body_ssim: float
    mae_body: float
    mae_lung: float
    mae_soft_tissue: float
    mae_vessel: float
    mae_bone: float
    clipped_fraction: float


def score_volume(
    pipeline: CTPAReconstructionPipeline,
    hu: np.ndarray,
    name: str,
    patch_size: Sequence[int],
    overlap: float | int = 0.25,
    blend: str = "gaussian",
    batch_size: int = 1,
) -> tuple[VolumeScore, CTPAReconstructionOutput]:
    """Reconstruct `hu` `(D, H, W)` (with latents and indices) and score it."""
    result = pipeline(
        hu, patch_size=patch_size, overlap=overlap, blend=blend, batch_size=batch_size, return_latents=True
    )
    scores = reconstruction_metrics(result.reconstruction, hu, pipeline.window, device=pipeline.vqgan.device)
    clipped = sum(clipped_fraction(hu, pipeline.window))
    mae = {f"mae_{region}": scores.mae[region] for region in ("body", *REGIONS)}
    return VolumeScore(name, scores.psnr, scores.ssim, scores.body_psnr, scores.body_ssim, **mae,
                       clipped_fraction=clipped), result  # fmt: skip


def iter_volumes(path: str | os.PathLike, split: str = "validation") -> Iterator[tuple[str, np.ndarray]]:
    """(name, HU `(D, H, W)`) of every volume in a folder of NIfTI files or a prepared dataset split."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        store = VolumeStore.from_disk(path, split)
        for index in range(len(store)):
            yield store.patient_ids[index], store.volume(index)
        return
    files = [path] if path.is_file() else find_nifti_files(path)
    if not files:
        raise ValueError(f"{path}: no .nii or .nii.gz files and not a prepared dataset")
    for file in files:
        yield str(file), load_ct(file).hu


def write_scores_csv(scores: Sequence[VolumeScore], path: str | os.PathLike) -> None:
    """One row per volume (the fields of :class:`VolumeScore`), written atomically."""
    with atomic_path(path, ".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, [f.name for f in fields(VolumeScore)])
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)
