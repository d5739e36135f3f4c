"""Running a model at another voxel spacing than a volume's own: resample, reconstruct, resample back.

`reconstruct_volume(pipe, ct, spacing)` (what `ctpa-vq reconstruct --spacing` runs) resamples the
volume to `spacing` (`ctpa_vq.data.resample`: linear, first voxel kept in place), reconstructs it
there and resamples the reconstruction back onto the input's own grid: the same shape, spacing and
affine as the input. `spacing="training"` is the median spacing of the model's training data
(`ctpa_vq.input_spec.training_spacing`), the remedy `check_input`'s warning names. Outside the
bundled pipeline: resampling needs scipy, which a remote-code load does not.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

from .data.nifti import CTVolume
from .data.resample import resample
from .data.volume_io import load_volume
from .input_spec import training_spacing
from .pipelines import CTPAReconstructionPipeline

TargetSpacing = Union[Sequence[float], str, None]
"""(D, H, W) in mm, "training" (the model's median training spacing), or None (the volume's own grid)."""


def target_spacing(pipeline: CTPAReconstructionPipeline, spacing: TargetSpacing) -> tuple[float, float, float] | None:
    """`spacing` as three positive mm values (None stays None); "training" read from the model's record."""
    if spacing is None:
        return None
    if isinstance(spacing, str):
        if spacing != "training":
            raise ValueError(f"spacing must be 'training' or three values in mm (D, H, W), got {spacing!r}")
        return training_spacing(pipeline.vqgan.config.training_data)
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"spacing must be three positive values in mm (D, H, W), got {tuple(spacing)}")
    return values


def reconstruct_volume(
    pipeline: CTPAReconstructionPipeline, volume: CTVolume | str | os.PathLike, spacing: TargetSpacing = None,
    **options,
) -> np.ndarray:
    """The reconstruction `(D, H, W)` float32 HU of `volume` on its own grid, computed at `spacing`
    (see the module docstring); `options` go to the pipeline call (patch grid, blend, batch size)."""
    ct = volume if isinstance(volume, CTVolume) else load_volume(volume)
    target = target_spacing(pipeline, spacing)
    if target is None:
        return pipeline(ct.hu, spacing=ct.spacing, name=ct.name, **options).reconstruction
    resampled = resample(ct.hu, ct.spacing, target)
    reconstruction = pipeline(resampled, spacing=target, name=ct.name, **options).reconstruction
    return resample(reconstruction, target, ct.spacing, shape=ct.shape)
