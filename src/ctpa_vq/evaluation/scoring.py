"""Whole-volume evaluation: reconstruct each volume patch-wise and score it in HU.

Shared by `ctpa-vq evaluate` and the training loop's validation, so both report the same
numbers for the same model and grid.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..data.patch_dataset import VolumeStore
from ..data.volume_io import input_volumes
from ..models.intensity import clipped_fraction
from ..pipelines import CTPAReconstructionOutput, CTPAReconstructionPipeline
from ..pipelines.spacing import TargetSpacing, reconstruct_at
from ..utils.atomic import atomic_path
from .metrics import reconstruction_metrics
from .regions import REGIONS


@dataclass
class VolumeScore:
    """One volume's reconstruction quality in HU over the model's window.

    ``psnr`` (dB) and ``ssim`` over the whole volume; ``body_psnr`` and ``body_ssim`` over the
    body mask; ``mae_*`` the mean absolute HU error over the body and per region (lung, soft
    tissue, contrast-enhanced vessel, bone; see :mod:`ctpa_vq.evaluation.regions`; NaN where a region is
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
    patch_size: Sequence[int] | str | None = None,
    overlap: float | int | None = None,
    blend: str = "linear",
    batch_size: int = 1,
    max_patch_voxels: int | None = None,
    spacing: Sequence[float] | None = None,
    target_spacing: TargetSpacing = None,
) -> tuple[VolumeScore, CTPAReconstructionOutput]:
    """Reconstruct `hu` `(D, H, W)` (with latents and indices) and score it; the grid as for
    `CTPAReconstructionPipeline.patch_grid` (the pipeline's default). `spacing` (mm), if known, goes to
    the pipeline's check of the volume against the model's training data; with `target_spacing`
    the model runs at that spacing and is scored back on `hu`'s grid (`ctpa_vq.pipelines.spacing.reconstruct_at`)."""
    result = reconstruct_at(
        pipeline, hu, spacing, target_spacing, name, patch_size=patch_size, overlap=overlap, blend=blend,
        batch_size=batch_size, return_latents=True, max_patch_voxels=max_patch_voxels,
    )
    scores = reconstruction_metrics(result.reconstruction, hu, pipeline.window, device=pipeline.vqgan.device)
    clipped = sum(clipped_fraction(hu, pipeline.window))
    mae = {f"mae_{region}": scores.mae[region] for region in ("body", *REGIONS)}
    return VolumeScore(name, scores.psnr, scores.ssim, scores.body_psnr, scores.body_ssim, **mae,
                       clipped_fraction=clipped), result  # fmt: skip


def iter_volumes(
    path: str | os.PathLike, split: str = "validation", name: Callable[[str], str] = str
) -> Iterator[tuple[str, Callable[[], tuple[np.ndarray, tuple[float, float, float]]]]]:
    """(name, read -> (HU `(D, H, W)`, spacing in mm)) of every volume in a file, a folder of volumes
    (NIfTI, NRRD, MetaImage, DICOM series) or a prepared dataset split.

    Volumes are read only when their reader is called, so a caller can report a bad one and go
    on; the reader raises :class:`~ctpa_vq.data.nifti.CTFileError` naming the file (its subclass
    :class:`~ctpa_vq.data.dicom.SkippedSeries` for a localizer, secondary capture, ...). ``name``
    maps a volume's path relative to ``path`` (a file's own name) to the name given, e.g. the
    pseudonym `prepare` stores as its ``source``; a prepared split's names are its stored patient ids.
    """
    path = Path(path)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        store = VolumeStore.from_disk(path, split)
        for index in range(len(store)):
            yield store.patient_ids[index], lambda index=index: (store.volume(index), store.spacings[index])
        return
    root = path if path.is_dir() else path.parent
    for source in input_volumes(path):
        yield name(os.path.relpath(source.name, root)), lambda source=source: _hu_and_spacing(source.load())


def _hu_and_spacing(volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    return volume.hu, volume.spacing


def write_scores_csv(scores: Sequence[VolumeScore], path: str | os.PathLike) -> None:
    """One row per volume (the fields of :class:`VolumeScore`), written atomically."""
    with atomic_path(path, ".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, [f.name for f in fields(VolumeScore)])
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)
