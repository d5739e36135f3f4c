"""Resampling to a target spacing and back: linear interpolation is exact on a linear HU ramp."""

from __future__ import annotations

import numpy as np
import pytest

from ctpa_vq.data.resample import resample, resampled_affine, resampled_shape

SPACING = (1.0, 0.7, 0.7)
TARGET = (2.5, 1.05, 1.6)


def _ramp(shape, spacing):
    """HU that grow linearly with the position in mm: 3 z + 2 y + x."""
    d, h, w = np.indices(shape).astype(np.float64)
    return 3 * d * spacing[0] + 2 * h * spacing[1] + w * spacing[2]


def test_resampled_grid_holds_the_ramp_at_its_own_positions():
    shape = (21, 30, 33)
    coarse = resample(_ramp(shape, SPACING), SPACING, TARGET)
    # The last coarse centre stays inside the source extent: floor((n - 1) * s / t) + 1 voxels.
    assert coarse.shape == resampled_shape(shape, SPACING, TARGET) == (9, 20, 15)
    np.testing.assert_allclose(coarse, _ramp(coarse.shape, TARGET), atol=1e-3)


def test_back_onto_the_source_grid_is_exact_inside_the_coarse_extent():
    shape = (21, 30, 33)
    source = _ramp(shape, SPACING)
    back = resample(resample(source, SPACING, TARGET), TARGET, SPACING, shape=shape)
    assert back.shape == shape
    inside = tuple(slice(0, int((n - 1) * t / s) + 1) for n, s, t in zip(resampled_shape(shape, SPACING, TARGET),
                                                                         SPACING, TARGET))
    np.testing.assert_allclose(back[inside], source[inside], atol=1e-3)


def test_resampled_affine_keeps_the_first_voxel_and_scales_the_steps():
    affine = np.array([[0.0, 0.0, -1.0, 40.0], [-0.7, 0.0, 0.0, 30.0], [0.0, 0.7, 0.0, -60.0], [0, 0, 0, 1.0]])
    new = resampled_affine(affine, SPACING, TARGET)  # columns: x = W, y = H, z = D
    np.testing.assert_allclose(new[:, 3], affine[:, 3])
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), TARGET[::-1])


def test_non_positive_target_spacing_is_refused():
    with pytest.raises(ValueError, match="target spacing must be positive"):
        resample(np.zeros((4, 4, 4)), SPACING, (1.0, 0.0, 1.0))
