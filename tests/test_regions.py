"""Body mask and HU regions (ctpa_vq.evaluation.regions) on synthetic bodies with known anatomy."""

from __future__ import annotations

import numpy as np

from ctpa_vq.evaluation.regions import OUTSIDE, REGIONS, body_mask, region_labels

LABEL = {name: i + 1 for i, name in enumerate(REGIONS)}


def _ellipse(shape, center, radii):
    h, w = np.ogrid[: shape[0], : shape[1]]
    return ((h - center[0]) / radii[0]) ** 2 + ((w - center[1]) / radii[1]) ** 2 <= 1


def _chest(depth=6, size=48):
    """Air, out-of-field padding at the corners, a soft-tissue trunk whose two lungs run through
    every slice (open at both ends, so only a per-slice fill closes them), a table below the
    trunk, and dense specks in the air. Returns (hu, expected body mask)."""
    plane = (size, size)
    hu = np.full((depth, *plane), -1000, dtype=np.int16)
    hu[:, ~_ellipse(plane, (size / 2, size / 2), (size * 0.72, size * 0.72))] = -3024  # outside the field of view
    trunk = _ellipse(plane, (22, 24), (14, 20))
    hu[:, trunk] = 40
    hu[:, _ellipse(plane, (22, 15), (7, 6))] = -850  # lungs: holes in the trunk in every slice
    hu[:, _ellipse(plane, (22, 33), (7, 6))] = -850
    hu[:, 39:41, 6:42] = 200  # table: dense, but not touching the trunk
    hu[2, 3, 3] = 500  # isolated specks in the air
    hu[4, 5, 44] = 0
    return hu, np.broadcast_to(trunk, hu.shape)


def test_body_is_the_filled_trunk_without_table_padding_or_specks():
    hu, expected = _chest()
    body = body_mask(hu)
    assert body.dtype == bool
    np.testing.assert_array_equal(body, expected)


def test_body_of_pure_air_is_empty():
    assert not body_mask(np.full((4, 8, 8), -1000, dtype=np.int16)).any()


def test_regions_split_at_the_documented_thresholds():
    hu, _ = _chest()
    values = {-1000: "lung", -401: "lung", -400: "soft_tissue", 149: "soft_tissue", 150: "vessel", 499: "vessel",
              500: "bone", 1800: "bone"}  # fmt: skip
    for column, value in enumerate(values):  # one voxel per value inside the trunk's soft tissue
        hu[:, 30, 18 + column] = value
    labels = region_labels(hu)
    assert labels.dtype == np.uint8
    for column, (value, region) in enumerate(values.items()):
        assert labels[0, 30, 18 + column] == LABEL[region], value
    assert (labels[:, 22, 15] == LABEL["lung"]).all()  # inside the lung hole
    assert (labels[:, 40, 20] == OUTSIDE).all()  # the table
    assert (labels[:, 1, 1] == OUTSIDE).all()  # padding


def test_regions_respect_a_given_body_mask():
    hu = np.full((3, 8, 8), 40, dtype=np.int16)
    body = np.zeros(hu.shape, dtype=bool)
    body[1, 2:5, 2:5] = True
    labels = region_labels(hu, body)
    np.testing.assert_array_equal(labels, np.where(body, LABEL["soft_tissue"], OUTSIDE))
