"""Synthetic CTPA phantoms: deterministic, any shape, plausible HU anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from ctpa_vq.data.nifti import load_ct
from ctpa_vq.data.phantom import PhantomAnatomy, make_phantom, write_phantom_dir, write_phantom_nifti

SHAPE = (48, 64, 64)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, seed=3)


def test_deterministic_by_seed():
    np.testing.assert_array_equal(make_phantom(SHAPE, seed=1), make_phantom(SHAPE, seed=1))
    assert (make_phantom(SHAPE, seed=1) != make_phantom(SHAPE, seed=2)).mean() > 0.3


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 33, 17), (5, 64, 40)])
def test_any_shape(shape):
    volume = make_phantom(shape, seed=0)
    assert volume.shape == shape and volume.dtype == np.int16


def test_air_outside_the_body(phantom):
    corners = phantom[:, :3, :3]
    assert abs(np.median(corners) + 1000) <= 10


def test_lungs_near_minus_850_hu(phantom):
    mid = phantom[SHAPE[0] // 2]
    lung = mid[(mid > -950) & (mid < -700)]
    assert lung.size > 0.1 * mid.size
    assert -880 < lung.mean() < -820
    assert lung.std() > 10  # texture and noise, not a flat value


def test_contrast_filled_pulmonary_arteries_branch_into_the_lungs(phantom):
    anatomy = PhantomAnatomy.draw(np.random.default_rng(3))
    arteries = np.abs(phantom.astype(np.float32) - anatomy.artery_hu) < 60
    assert 300 <= anatomy.artery_hu <= 500
    assert arteries.sum() > 500
    # artery voxels inside both lungs, not only in the mediastinum
    depth, height, width = SHAPE
    d, h, w = np.nonzero(arteries)
    x = w / (width - 1) * 2 - 1
    assert (x < -0.3).sum() > 50 and (x > 0.3).sum() > 50


def test_soft_tissue_fat_and_bone(phantom):
    assert ((phantom > 0) & (phantom < 80)).mean() > 0.05
    assert ((phantom > -150) & (phantom < -50)).mean() > 0.005
    assert (phantom > 600).sum() > 100


def test_phantom_nifti_round_trip(tmp_path):
    path = write_phantom_nifti(tmp_path / "p.nii.gz", (16, 20, 24), seed=4, spacing=(2.0, 0.5, 0.5))
    volume = load_ct(path)
    np.testing.assert_array_equal(volume.hu, make_phantom((16, 20, 24), seed=4))
    assert volume.spacing == (2.0, 0.5, 0.5)


def test_phantom_dir(tmp_path):
    paths = write_phantom_dir(tmp_path, 3, (16, 16, 16), seed=10, compressed=False)
    assert [p.name for p in paths] == ["phantom_000.nii", "phantom_001.nii", "phantom_002.nii"]
    np.testing.assert_array_equal(load_ct(paths[2]).hu, make_phantom((16, 16, 16), seed=12))
