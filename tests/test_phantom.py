"""Synthetic CTPA phantoms: deterministic, any shape, CTPA-like HU per structure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctpa_vq.data.nifti import load_ct
from ctpa_vq.data.phantom import Structure, make_labelled_phantom, make_phantom, write_phantom_dir, write_phantom_nifti

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def clean():
    """The noise-free anatomy."""
    return make_labelled_phantom(SHAPE, seed=3, noise_hu=0)


def test_deterministic_by_seed():
    np.testing.assert_array_equal(make_phantom(SHAPE, seed=1), make_phantom(SHAPE, seed=1))
    assert (make_phantom(SHAPE, seed=1) != make_phantom(SHAPE, seed=2)).mean() > 0.3


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 33, 17), (5, 64, 40), (1, 8, 9), (40, 24, 96)])
def test_any_shape(shape):
    phantom = make_labelled_phantom(shape, seed=0)
    assert phantom.hu.shape == phantom.labels.shape == shape
    assert phantom.hu.dtype == np.int16 and phantom.labels.dtype == np.uint8


def test_bad_shape():
    with pytest.raises(ValueError, match="positive"):
        make_phantom((0, 8, 8))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_padding_outside_the_circular_field_of_view(seed):
    hu = make_phantom((8, 64, 80), seed=seed)
    corners = hu[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    padding = corners[0, 0]
    assert padding in (-2048, -3024) and (corners == padding).all()
    y, x = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 80), indexing="ij")
    assert (hu[:, x**2 + y**2 > 1.02] == padding).all()
    inside = hu[:, x**2 + y**2 < 0.98]
    assert inside.min() >= -1024 and np.median(hu[:, np.hypot(x, y) > 0.97].clip(-1024)) == pytest.approx(-1000, abs=40)


def test_hu_per_structure_before_noise(clean):
    hu, labels = clean.hu, clean.labels

    def region(structure):
        values = hu[labels == structure].astype(np.float64)
        assert values.size > 100, structure.name
        return values

    assert 300 <= region(Structure.PULMONARY_ARTERY).min() and region(Structure.PULMONARY_ARTERY).max() <= 600
    assert -880 <= np.median(region(Structure.LUNG)) <= -820
    assert -120 <= np.median(region(Structure.FAT)) <= -80
    assert 20 <= np.median(region(Structure.SOFT_TISSUE)) <= 80
    assert np.median(region(Structure.AIR)) == -1000
    assert 100 <= np.median(region(Structure.BLOOD)) and region(Structure.BLOOD).max() <= 1000
    bone = region(Structure.BONE)
    assert 250 <= bone.min() and bone.max() <= 1200 and (bone >= 700).mean() > 0.3
    # the labels cover real anatomy: lungs and soft tissue are a large part of the chest
    assert (labels == Structure.LUNG).mean() > 0.08 and (labels == Structure.SOFT_TISSUE).mean() > 0.1


def test_lung_parenchyma_has_correlated_texture(clean):
    lung = clean.labels == Structure.LUNG
    both = lung[:, :, 1:] & lung[:, :, :-1]
    left, right = clean.hu[:, :, :-1][both].astype(float), clean.hu[:, :, 1:][both].astype(float)
    assert 15 < left.std()
    assert np.corrcoef(left, right)[0, 1] > 0.4  # neighbours alike: texture, not white noise


def test_ct_noise_is_correlated_in_plane_not_across_slices(clean):
    noisy = make_phantom(SHAPE, seed=3, noise_hu=15.0).astype(np.float64)
    inside = (clean.labels != Structure.OUTSIDE_FOV) & (clean.hu > -900) & (clean.hu < 900)  # away from clipping
    noise = noisy - clean.hu
    assert noise[inside].std() == pytest.approx(15.0, rel=0.1)
    assert (noise[clean.labels == Structure.OUTSIDE_FOV] == 0).all()

    def correlation(axis):
        both = inside & np.roll(inside, 1, axis)
        both[(slice(None),) * axis + (0,)] = False
        return np.corrcoef(noise[both], np.roll(noise, 1, axis)[both])[0, 1]

    assert correlation(2) > 0.3 and correlation(1) > 0.3  # kernel-like grain in-plane
    assert abs(correlation(0)) < 0.05


def test_pulmonary_arterial_tree_is_connected_branching_and_tapering():
    phantom = make_labelled_phantom((64, 128, 128), seed=5, noise_hu=0)
    tree = phantom.labels == Structure.PULMONARY_ARTERY
    _, components = ndimage.label(tree, structure=np.ones((3, 3, 3)))
    assert components == 1
    x = np.linspace(-1, 1, 128)[None, None, :]
    in_lung_side = np.broadcast_to(np.abs(x) > 0.35, tree.shape)
    # branches reach both lungs, surrounded by parenchyma
    for side in (x < -0.35, x > 0.35):
        assert (tree & np.broadcast_to(side, tree.shape)).sum() > 200
    # tapering: thick near the mediastinum, thin in the periphery
    thickness = ndimage.distance_transform_edt(tree)
    assert thickness[~in_lung_side].max() > 2 * np.percentile(thickness[tree & in_lung_side], 90)
    # branching: an axial slice through the lungs cuts many separate branches (one tube per side: 2)
    assert max(ndimage.label(section)[1] for section in tree & in_lung_side) >= 6


def test_phantom_nifti_round_trip(tmp_path):
    path = write_phantom_nifti(tmp_path / "p.nii.gz", (16, 20, 24), seed=4, spacing=(2.0, 0.5, 0.5))
    volume = load_ct(path)
    np.testing.assert_array_equal(volume.hu, make_phantom((16, 20, 24), seed=4))
    assert volume.spacing == (2.0, 0.5, 0.5)


def test_phantom_dir(tmp_path):
    paths = write_phantom_dir(tmp_path, 3, (16, 16, 16), seed=10, compressed=False)
    assert [p.name for p in paths] == ["phantom_000.nii", "phantom_001.nii", "phantom_002.nii"]
    np.testing.assert_array_equal(load_ct(paths[2]).hu, make_phantom((16, 16, 16), seed=12))
