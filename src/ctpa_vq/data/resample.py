"""Resampling a canonical volume to a target voxel spacing, and back onto its own grid.

Both directions are one ``scipy.ndimage.affine_transform`` with a diagonal matrix (canonical
volumes are axis-aligned), linear interpolation (splines overshoot at air/bone edges, which in
HU means invented values), and the first voxel centre kept in place. The resampled grid covers
the original extent without reaching past it: ``n' = floor((n - 1) * s / s') + 1`` voxels per
axis. Going back, voxels past the resampled grid's last centre (less than one target voxel)
take its edge value.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

Spacing = Sequence[float]


def resampled_shape(shape: Sequence[int], spacing: Spacing, target_spacing: Spacing) -> tuple[int, int, int]:
    """The (D, H, W) shape of ``shape`` at ``spacing`` resampled to ``target_spacing`` (see module docstring)."""
    return tuple(int(np.floor((n - 1) * s / t + 1e-6)) + 1 for n, s, t in zip(shape, spacing, target_spacing))


def resample(
    hu: np.ndarray, spacing: Spacing, target_spacing: Spacing, shape: Sequence[int] | None = None
) -> np.ndarray:
    """``hu`` (D, H, W) at ``spacing`` mm -> float32 (D', H', W') at ``target_spacing`` mm.

    ``shape`` (default :func:`resampled_shape`) sets the output grid, e.g. the original shape
    when going back: ``resample(out, target_spacing, spacing, shape=hu.shape)``.
    """
    if any(float(t) <= 0 for t in target_spacing):
        raise ValueError(f"target spacing must be positive, got {tuple(target_spacing)}")
    shape = tuple(shape) if shape is not None else resampled_shape(hu.shape, spacing, target_spacing)
    scale = np.array([float(t) / float(s) for s, t in zip(spacing, target_spacing)])
    return ndimage.affine_transform(hu, scale, output_shape=shape, output=np.float32, order=1, mode="nearest")


def resampled_affine(affine: np.ndarray, spacing: Spacing, target_spacing: Spacing) -> np.ndarray:
    """The canonical affine (columns x, y, z = W, H, D) of the resampled grid: same first voxel, new steps."""
    scale_xyz = [float(t) / float(s) for s, t in zip(spacing, target_spacing)][::-1]
    return np.asarray(affine, dtype=np.float64) @ np.diag([*scale_xyz, 1.0])
