"""The separable 3D SSIM of `ctpa_vq.evaluation.metrics` against an independent float64 computation.

The reference is the textbook formula written out in NumPy: the full (non-separable) 11^3
Gaussian kernel over every window of the reflect-padded volumes (torchmetrics' padding), local
moments in float64. The metric must agree to float32 rounding, for whole volumes, over a mask,
with slabs and blocks that do not divide the volume.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.evaluation.metrics import reconstruction_metrics, ssim_hu
from ctpa_vq.evaluation.regions import OUTSIDE, region_labels

WINDOW = (-1024.0, 2048.0)


def reference_ssim_map(x: np.ndarray, y: np.ndarray, window=WINDOW, sigma=1.5, size=11) -> np.ndarray:
    """SSIM map `(D, H, W)` of two HU volumes over `window`, in float64, with the full 3D kernel."""
    low, high = window
    x, y = (np.clip(v.astype(np.float64), low, high) for v in (x, y))
    offsets = np.arange(size) - size // 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    g /= g.sum()
    kernel = g[:, None, None] * g[None, :, None] * g[None, None, :]

    def local_mean(v):
        padded = np.pad(v, size // 2, mode="reflect")
        return np.einsum("dhwijk,ijk->dhw", sliding_window_view(padded, (size,) * 3), kernel)

    mx, my = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    c1, c2 = (0.01 * (high - low)) ** 2, (0.03 * (high - low)) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


@pytest.fixture(scope="module")
def pair():
    hu = make_phantom((21, 43, 38), seed=3).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 80, hu.shape).astype(np.float32)
    return hu + noise, hu


@pytest.mark.parametrize("block", [(16, 16, 16), (5, 7, 9), (40, 64, 64)])
def test_ssim_equals_the_full_kernel_reference(pair, block):
    reconstruction, hu = pair
    expected = reference_ssim_map(reconstruction, hu)
    assert 0.5 < expected.mean() < 0.99  # a figure where an error would show
    assert ssim_hu(reconstruction, hu, WINDOW, block=block) == pytest.approx(expected.mean(), abs=1e-6)
    body = region_labels(hu) != OUTSIDE
    assert 0 < body.sum() < body.size
    assert ssim_hu(reconstruction, hu, WINDOW, block=block, mask=body) == pytest.approx(expected[body].mean(), abs=1e-6)


def test_reconstruction_metrics_use_the_same_ssim_and_the_squared_errors(pair):
    reconstruction, hu = pair
    labels = region_labels(hu)
    expected = reference_ssim_map(reconstruction, hu)
    metrics = reconstruction_metrics(reconstruction, hu, WINDOW, labels=labels)
    body = labels != OUTSIDE
    assert metrics.ssim == pytest.approx(expected.mean(), abs=1e-6)
    assert metrics.body_ssim == pytest.approx(expected[body].mean(), abs=1e-6)
    error = np.clip(reconstruction, *WINDOW).astype(np.float64) - np.clip(hu, *WINDOW)
    width = WINDOW[1] - WINDOW[0]
    assert metrics.psnr == pytest.approx(10 * np.log10(width**2 / np.mean(error**2)), abs=1e-6)
    assert metrics.body_psnr == pytest.approx(10 * np.log10(width**2 / np.mean(error[body] ** 2)), abs=1e-6)


def test_identical_volumes_score_exactly_one(pair):
    _, hu = pair
    assert ssim_hu(hu, hu, WINDOW) == 1.0
