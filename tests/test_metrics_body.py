"""Body-masked PSNR/SSIM and per-region HU errors against hand-computed expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctpa_vq.evaluation.metrics import reconstruction_metrics, ssim_hu

WINDOW = (-1024.0, 2048.0)
# region: (HU in the reference, error the reconstruction makes there)
ANATOMY = {"lung": (-850, 10.0), "soft_tissue": (40, -20.0), "vessel": (300, 30.0), "bone": (1000, -40.0)}
AIR_ERROR = 5.0


def _phantom(shape=(12, 40, 40)):
    """Air around a box-shaped body split into four region blocks. Returns (hu, body, {region: mask})."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = np.zeros(shape, dtype=bool)
    body[:, 8:32, 8:32] = True
    masks = {}
    for i, name in enumerate(ANATOMY):  # four 6-voxel-wide stripes across the body
        mask = np.zeros(shape, dtype=bool)
        mask[:, 8:32, 8 + 6 * i : 14 + 6 * i] = True
        masks[name] = mask
    for name, mask in masks.items():
        hu[mask] = ANATOMY[name][0]
    lung_core = np.zeros(shape, dtype=bool)
    lung_core[:, 9:31, 9:14] = True
    wall = masks["lung"] & ~lung_core
    hu[wall] = 40  # a soft-tissue wall round the lung stripe makes the lung a hole in the body
    masks["soft_tissue"] |= wall
    masks["lung"] &= ~wall
    return hu, body, masks


def test_region_errors_equal_the_errors_put_there():
    hu, body, masks = _phantom()
    reconstruction = hu + AIR_ERROR
    for name, mask in masks.items():
        reconstruction[mask] = hu[mask] + ANATOMY[name][1]
    metrics = reconstruction_metrics(reconstruction, hu, WINDOW)

    for name, (_, error) in ANATOMY.items():
        assert metrics.mae[name] == pytest.approx(abs(error), rel=1e-6), name
    counts = {name: mask.sum() for name, mask in masks.items()}
    expected_body = sum(counts[n] * abs(e) for n, (_, e) in ANATOMY.items()) / sum(counts.values())
    assert metrics.mae["body"] == pytest.approx(expected_body, rel=1e-6)

    width = WINDOW[1] - WINDOW[0]
    error = (reconstruction - hu).astype(np.float64)
    assert metrics.body_psnr == pytest.approx(10 * math.log10(width**2 / np.mean(error[body] ** 2)), abs=1e-4)
    assert metrics.psnr == pytest.approx(10 * math.log10(width**2 / np.mean(error**2)), abs=1e-4)
    assert metrics.body_psnr < metrics.psnr  # the nearly exact air no longer flatters the figure


def test_errors_are_measured_inside_the_window():
    hu, _, masks = _phantom()
    hu[masks["bone"]] = 3000  # above the window: the model can only give 2048 back
    reconstruction = hu.copy()
    reconstruction[masks["bone"]] = 2048
    metrics = reconstruction_metrics(reconstruction, hu, WINDOW)
    assert metrics.mae["bone"] == 0
    assert math.isinf(metrics.body_psnr)


def test_an_absent_region_is_nan():
    hu, _, masks = _phantom()
    hu[masks["bone"]] = 40
    metrics = reconstruction_metrics(hu + 1, hu, WINDOW)
    assert math.isnan(metrics.mae["bone"])
    assert metrics.mae["soft_tissue"] == pytest.approx(1.0)


def test_body_ssim_ignores_errors_far_outside_the_body():
    hu, body, _ = _phantom()
    noisy = hu + np.random.default_rng(0).normal(0, 100, hu.shape).astype(np.float32)
    far_outside = np.ones(hu.shape, dtype=bool)
    far_outside[:, 2:38, 2:38] = False  # > 5 voxels (the SSIM kernel's reach) from the body
    reconstruction = np.where(far_outside, noisy, hu)
    metrics = reconstruction_metrics(reconstruction, hu, WINDOW)
    assert metrics.body_ssim == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim < 0.95


def test_body_ssim_is_the_body_share_of_the_ssim_map():
    hu, body, _ = _phantom()
    inner = np.zeros(hu.shape, dtype=bool)
    inner[:, 14:26, 14:26] = True  # > 5 voxels inside the body: air SSIM stays exactly 1
    noise = np.random.default_rng(1).normal(0, 100, hu.shape).astype(np.float32)
    reconstruction = np.where(inner, hu + noise, hu)
    metrics = reconstruction_metrics(reconstruction, hu, WINDOW)
    n, n_body = hu.size, body.sum()
    assert metrics.body_ssim < 0.99
    assert metrics.ssim * n == pytest.approx(metrics.body_ssim * n_body + (n - n_body), rel=1e-6)
    assert ssim_hu(reconstruction, hu, WINDOW, mask=body) == pytest.approx(metrics.body_ssim, abs=1e-7)
    assert ssim_hu(reconstruction, hu, WINDOW, block=(5, 7, 9), mask=body) == pytest.approx(metrics.body_ssim, abs=1e-6)


def test_empty_body_gives_nan_body_figures():
    hu = np.full((8, 16, 16), -1000.0, dtype=np.float32)
    metrics = reconstruction_metrics(hu + 3, hu, WINDOW)
    assert math.isnan(metrics.body_psnr) and math.isnan(metrics.body_ssim) and math.isnan(metrics.mae["body"])
    assert math.isfinite(metrics.psnr)
