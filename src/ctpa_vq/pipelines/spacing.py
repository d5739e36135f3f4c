"""Running a model at another voxel spacing than a volume's own: resample, reconstruct, resample back.

`reconstruct_volume(pipe, ct, spacing)` (what `ctpa-vq reconstruct --spacing` runs) resamples the
volume to `spacing` (`ctpa_vq.data.resample`: linear, first voxel kept in place), reconstructs it
there and resamples the reconstruction back onto the input's own grid: the same shape, spacing and
affine as the input. `spacing="training"` is the median spacing of the model's training data
(`ctpa_vq.models.input_spec.training_spacing`), the remedy `check_input`'s warning names. Outside the
bundled pipeline: resampling needs scipy, which a remote-code load does not.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

from ..data.nifti import CTVolume
from ..data.resample import resample
from ..data.volume_io import load_volume
from ..models.input_spec import training_spacing
from .reconstruction import CTPAReconstructionOutput, CTPAReconstructionPipeline

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


def reconstruct_at(
    pipeline: CTPAReconstructionPipeline, hu: np.ndarray, spacing: Sequence[float] | None, target: TargetSpacing,
    name: str | None = None, **options,
) -> CTPAReconstructionOutput:
    """The pipeline's output for `hu` `(D, H, W)` at `spacing` mm, run at `target` (see the module
    docstring): the reconstruction (numpy) on `hu`'s own grid, latents and indices (if asked for in
    `options`) at the target spacing. `target=None` runs on the volume's own grid."""
    resolved = target_spacing(pipeline, target)
    if resolved is None:
        return pipeline(hu, spacing=spacing, name=name, **options)
    if spacing is None:
        raise ValueError(f"{name or 'volume'}: resampling to {resolved} mm needs the volume's own spacing")
    output = pipeline(resample(hu, spacing, resolved), spacing=resolved, name=name, **options)
    output.reconstruction = resample(np.asarray(output.reconstruction), resolved, spacing, shape=hu.shape)
    return output


def reconstruct_volume(
    pipeline: CTPAReconstructionPipeline, volume: CTVolume | str | os.PathLike, spacing: TargetSpacing = None,
    **options,
) -> np.ndarray:
    """The reconstruction `(D, H, W)` float32 HU of `volume` on its own grid, computed at `spacing`
    (see the module docstring); `options` go to the pipeline call (patch grid, blend, batch size)."""
    ct = volume if isinstance(volume, CTVolume) else load_volume(volume)
    return reconstruct_at(pipeline, ct.hu, ct.spacing, spacing, ct.name, **options).reconstruction
