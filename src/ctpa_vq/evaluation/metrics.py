"""Reconstruction quality in HU: PSNR and 3D SSIM over the model's HU window.

Both metrics clip the two volumes to the window ``(low, high)`` and use the window width as
the data range, so they measure what the model can represent (what the window clips is
reported separately, see :func:`ctpa_vq.models.intensity.clipped_fraction`).

SSIM is torchmetrics' 3D SSIM (Gaussian window, sigma 1.5, 11 voxels wide; the volume's edges
reflected; k1 0.01, k2 0.03), computed here without torchmetrics: its full 11^3 ``conv3d`` over
five stacked products costs 1331 multiply-adds per voxel and product (52 s for a 133x512x512
volume on 2 CPU cores, more than reconstructing it). The Gaussian window is separable, so
:func:`ssim_hu` filters along one axis at a time, as matrix products over blocks of the axis
(each block of ``b`` outputs reads ``b + 10`` inputs: a banded matrix, which BLAS or the GPU
runs fast), on four local moments (the means of both volumes, of ``x^2 + y^2`` and of ``x y``:
the SSIM formula needs the two variances only as a sum), centred on each slab's mean so the
float32 variances keep their precision (and with taps that sum to exactly 1 in float32). The
volume is processed in slabs of ``block[0]`` slices (a 5-slice halo read either side), so
memory stays that of a slab (about 0.3 GiB for 16 slices of 512x512), whatever the volume's
size; on the pipeline's device (a GPU when it has one; TF32 is switched off for these
products). Against a float64 computation of the same formula it is within 1e-7, torchmetrics
in float32 4e-5 (``tests/test_ssim_metric.py``).

PSNR and the per-region errors come from one pass of squared and absolute errors per label
(:func:`region_errors`); :func:`psnr_hu` alone uses torchmetrics' ``PeakSignalNoiseRatio``.

Over the body (:mod:`ctpa_vq.evaluation.regions`): the air around the patient and the out-of-field padding
are reconstructed almost perfectly and inflate whole-volume PSNR/SSIM, so
:func:`reconstruction_metrics` also reports PSNR and SSIM over the body mask of the reference
(SSIM: the same SSIM map, averaged over body voxels only) and the mean absolute HU error per
region (lung, soft tissue, vessel, bone), both volumes clipped to the window first.

No MS-SSIM: torchmetrics' multi-scale SSIM runs 3D only on the whole volume at once (~60 GiB
of temporaries for a 604x512x512 volume) and its default five scales with an 11-voxel kernel
need more than 160 voxels along every axis (a 61-slice chest CT fails at the fifth scale).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torchmetrics.image import PeakSignalNoiseRatio

from ..models.intensity import DEFAULT_HU_WINDOW
from .regions import OUTSIDE, REGIONS, region_labels

SSIM_SIGMA = 1.5
SSIM_KERNEL = 11  # torchmetrics' defaults; the Gaussian kernel it derives from sigma 1.5 is 11 wide too
SSIM_K1, SSIM_K2 = 0.01, 0.03
_HALO = SSIM_KERNEL // 2
SSIM_BLOCK = (16, 16, 16)  # slab depth, then the output block of the banded products along H and W
SLAB = 32  # slices per PSNR / region-error update


@dataclass
class ReconstructionMetrics:
    """Quality of a reconstruction against its reference, all in HU over ``window``.

    ``psnr`` (dB) and ``ssim`` cover every voxel; ``body_psnr`` and ``body_ssim`` only the
    reference's body mask; ``mae`` is the mean absolute error (HU) over the body (``"body"``)
    and per region of :data:`ctpa_vq.evaluation.regions.REGIONS`. Empty masks give NaN.
    """

    psnr: float
    ssim: float
    window: tuple[float, float]
    body_psnr: float = float("nan")
    body_ssim: float = float("nan")
    mae: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        regions = ", ".join(f"{name} {value:.1f}" for name, value in self.mae.items() if name != "body")
        return (
            f"PSNR {self.psnr:.2f} dB, SSIM {self.ssim:.4f}; body: PSNR {self.body_psnr:.2f} dB, "
            f"SSIM {self.body_ssim:.4f}, MAE {self.mae.get('body', float('nan')):.1f} HU ({regions}) "
            f"(HU window {self.window[0]:g}..{self.window[1]:g})"
        )


def _as_5d(volume: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(D, H, W)`` or ``(B, C, D, H, W)`` -> ``(B, C, D, H, W)`` tensor, sharing memory (no copy).

    Read-only inputs (memory-mapped validation volumes) are fine: the metrics only read them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.as_tensor(volume)
    if tensor.ndim == 3:
        tensor = tensor[None, None]
    if tensor.ndim != 5:
        raise ValueError(f"expected a (D, H, W) or (B, C, D, H, W) volume, got shape {tuple(tensor.shape)}")
    return tensor


def _check_pair(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    if reconstruction.shape != target.shape:
        raise ValueError(f"shapes differ: reconstruction {tuple(reconstruction.shape)} vs target {tuple(target.shape)}")


def psnr_hu(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
) -> float:
    """PSNR in dB over all voxels of ``(D, H, W)`` or ``(B, C, D, H, W)`` HU volumes (inf if identical)."""
    reconstruction, target = _as_5d(reconstruction), _as_5d(target)
    _check_pair(reconstruction, target)
    # One volume, one process: never sync across torch.distributed (validation runs on rank 0 alone).
    metric = PeakSignalNoiseRatio(data_range=(float(window[0]), float(window[1])), sync_on_compute=False).to(device)
    for start in range(0, target.shape[2], SLAB):
        part = slice(start, start + SLAB)
        metric.update(*(v[:, :, part].to(device, torch.float32) for v in (reconstruction, target)))
    return float(metric.compute())


def _reflected(start: int, stop: int, size: int) -> torch.Tensor:
    """Indices ``start - 5 .. stop + 4`` of an axis of ``size`` voxels, reflected at its ends as
    torchmetrics pads (``-1 -> 1``, ``size -> size - 2``); beyond the reflection, clamped."""
    index = np.abs(np.arange(start - _HALO, stop + _HALO))
    index = np.where(index >= size, 2 * (size - 1) - index, index)
    return torch.as_tensor(np.clip(index, 0, size - 1))


def _band(block: int, device: torch.device | str) -> torch.Tensor:
    """``(block + 10, block)`` float32: column ``j`` holds the 1D Gaussian at rows ``j .. j + 10``.

    The float32 taps sum to exactly 1 (the residual of rounding goes to the centre tap): three
    passes of a filter that scaled a constant by ``1 + e`` would leave a local variance of about
    ``-3 e value^2`` in flat regions, i.e. SSIM errors of 1e-4 in air.
    """
    offsets = np.arange(SSIM_KERNEL) - _HALO
    taps = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    taps[_HALO] += np.float32(1 - taps.astype(np.float64).sum())
    band = np.zeros((block + 2 * _HALO, block), dtype=np.float32)
    for j in range(block):
        band[j : j + SSIM_KERNEL, j] = taps
    return torch.as_tensor(band, device=device)


def _smooth(moments: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """The Gaussian along ``axis`` of ``moments``, whose ``axis`` holds ``n * block`` positions with a
    5-voxel halo either side (``n * block + 10``); returns those ``n * block`` positions.

    Blocks of ``block`` outputs are overlapping windows of ``block + 10`` inputs (a view), each
    multiplied by the banded matrix: one batched matrix product per axis.
    """
    shape = moments.shape
    length, before, after = shape[axis], math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    blocks = (length - 2 * _HALO) // block
    windows = moments.reshape(before, length, after).unfold(1, block + 2 * _HALO, block)  # (A, n, B, block + 10)
    band = _band(block, moments.device)
    if after == 1:  # one copy of the windows, then one matrix product (a batched one would copy per row)
        smoothed = windows[:, :, 0].reshape(-1, block + 2 * _HALO) @ band  # (A * n, block)
    else:
        smoothed = band.T @ windows.transpose(-1, -2)  # (A, n, block, B)
    return smoothed.reshape(*shape[:axis], blocks * block, *shape[axis + 1 :])


def _reflect_pad(volume: torch.Tensor, axis: int, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``volume`` with ``axis`` reflected 5 voxels beyond either end (torchmetrics' padding), then
    zeros up to a whole number of ``block`` outputs (read only by outputs past the end); into
    ``out`` if given."""
    size = volume.shape[axis]
    parts = [volume.narrow(axis, 1, _HALO).flip(axis), volume, volume.narrow(axis, size - 1 - _HALO, _HALO).flip(axis)]
    extra = -size % block
    if extra:
        parts.append(volume.new_zeros(*volume.shape[:axis], extra, *volume.shape[axis + 1 :]))
    return torch.cat(parts, axis, out=out) if out is not None else torch.cat(parts, axis)


@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """CUDA matrix products in IEEE float32 (TF32 would move SSIM's local variances by ~1e-3)."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def _ssim_slabs(
    reconstruction: torch.Tensor, target: torch.Tensor, window: Sequence[float], device: torch.device | str,
    block: Sequence[int],
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Per slab of ``block[0]`` slices of ``(B, C, D, H, W)`` volumes: its slices and its SSIM map
    ``(B, C, slices, H, W)`` (float32, on ``device``)."""
    _check_pair(reconstruction, target)
    if min(target.shape[2:]) <= _HALO:
        raise ValueError(f"3D SSIM needs more than {_HALO} voxels per axis, got shape {tuple(target.shape[2:])}")
    low, high = float(window[0]), float(window[1])
    c1, c2 = (SSIM_K1 * (high - low)) ** 2, (SSIM_K2 * (high - low)) ** 2
    depth, slab = target.shape[2], min(int(block[0]), target.shape[2])
    height, width = target.shape[3:]
    blocks = min(int(block[1]), height), min(int(block[2]), width)
    with _ieee_float32():
        for start in range(0, depth, slab):
            stop = min(start + slab, depth)
            rows = _reflected(start, start + slab, depth)  # a short last slab reads (and drops) clamped rows
            padded = (len(rows), height + 2 * _HALO + -height % blocks[0], width + 2 * _HALO + -width % blocks[1])
            moments = torch.empty(4, *target.shape[:2], *padded, device=device)  # (4, B, C, slab + 10, H', W'), centred
            clipped = [v[:, :, rows].to(device, torch.float32).clamp_(low, high) for v in (reconstruction, target)]
            # Centred on the slab's mean: the local variances (shift-invariant) keep float32's precision.
            centre = float(clipped[1].mean())
            for moment, volume in zip(moments, clipped):  # padded in H and W
                _reflect_pad(_reflect_pad(volume.sub_(centre), 3, blocks[0]), 4, blocks[1], out=moment)
            del clipped
            # Products commute with the padding: the moments of the padded volumes are the padded moments.
            x, y = moments[0], moments[1]
            torch.mul(x, x, out=moments[2]).addcmul_(y, y)
            torch.mul(x, y, out=moments[3])
            del x, y
            for axis, size in ((3, slab), (4, blocks[0]), (5, blocks[1])):
                moments = _smooth(moments, axis, size)
            mean_x, mean_y, squares, product = moments[:, :, :, : stop - start, :height, :width]
            del moments
            # SSIM of the uncentred means a = mean_x + centre, b = mean_y + centre: 2ab and a^2 + b^2
            # share the term 2 centre (mean_x + mean_y) + 2 centre^2.
            shared = (mean_x + mean_y).mul_(2 * centre).add_(2 * centre**2 + c1)
            product_of_means, squared_means = mean_x * mean_y, mean_x.square_().add_(mean_y.square_())
            ssim = (2 * product_of_means + shared).mul_((product - product_of_means).mul_(2).add_(c2))
            # No clamp of the variances at 0 (torchmetrics has one): with c2 > 0 a rounding below 0 is harmless, and
            # unclamped, identical volumes give exactly 1.
            ssim.div_((squared_means + shared).mul_((squares - squared_means).add_(c2)))
            yield slice(start, stop), ssim


def _ssim_sums(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    window: Sequence[float],
    device: torch.device | str,
    block: Sequence[int],
    mask: torch.Tensor | None,
) -> tuple[float, float]:
    """Sum of the 3D SSIM map over all voxels and over ``mask`` (0 without one), slab by slab."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    masked = torch.zeros((), dtype=torch.float64, device=device)
    for slices, ssim in _ssim_slabs(reconstruction, target, window, device, block):
        total += ssim.sum(dtype=torch.float64)
        if mask is not None:
            masked += ssim[mask[:, :, slices].to(device)].sum(dtype=torch.float64)
    return float(total), float(masked)


def ssim_hu(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
    block: Sequence[int] = SSIM_BLOCK,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """3D SSIM (Gaussian sigma 1.5, 11^3 kernel) averaged over all voxels, or over the True
    voxels of ``mask`` (same shape; NaN if empty); every axis needs > 5 voxels.

    Computed on ``device`` in slabs of ``block[0]`` slices (``block[1:]``: the blocks of the banded
    products along H and W); the result equals torchmetrics' SSIM of the whole volume.
    """
    reconstruction, target = _as_5d(reconstruction), _as_5d(target)
    if mask is None:
        return _ssim_sums(reconstruction, target, window, device, block, None)[0] / target.numel()
    mask = _as_5d(mask).bool()
    _check_pair(mask, target)
    count = int(mask.sum())
    return _ssim_sums(reconstruction, target, window, device, block, mask)[1] / count if count else float("nan")


def region_errors(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label of ``labels`` (small non-negative ints, e.g. :func:`ctpa_vq.evaluation.regions.region_labels`):
    voxel count, sum of absolute and sum of squared HU errors, both volumes clipped to ``window``.

    Returns three float64 arrays of length ``labels.max() + 1``; computed slab by slab on
    ``device`` (differences in float32, exact for integral HU; squares and sums in float64).
    """
    reconstruction, target, labels = _as_5d(reconstruction), _as_5d(target), _as_5d(labels)
    _check_pair(reconstruction, target)
    _check_pair(labels, target)
    low, high = float(window[0]), float(window[1])
    size = int(labels.max()) + 1
    count, abs_sum, sq_sum = (torch.zeros(size, dtype=torch.float64, device=device) for _ in range(3))
    for start in range(0, target.shape[2], SLAB):
        part = slice(start, start + SLAB)
        clipped = [v[:, :, part].to(device, torch.float32).clamp_(low, high) for v in (reconstruction, target)]
        error = (clipped[0] - clipped[1]).flatten().double()  # bincount sums in its weights' dtype
        index = labels[:, :, part].to(device).long().flatten()
        count += torch.bincount(index, minlength=size)
        abs_sum += torch.bincount(index, weights=error.abs(), minlength=size)
        sq_sum += torch.bincount(index, weights=error.square(), minlength=size)
    return count.cpu().numpy(), abs_sum.cpu().numpy(), sq_sum.cpu().numpy()


def _psnr(width: float, squared_error: float, count: float) -> float:
    """PSNR in dB of a mean squared error ``squared_error / count`` over a data range ``width``
    (inf when exact, NaN when ``count`` is 0)."""
    if not count:
        return float("nan")
    with np.errstate(divide="ignore"):
        return float(10 * np.log10(width**2 / np.float64(squared_error / count)))


def reconstruction_metrics(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
    labels: np.ndarray | None = None,
) -> ReconstructionMetrics:
    """Whole-volume and body PSNR/SSIM and per-region MAE of ``reconstruction`` against the
    ``(D, H, W)`` HU volume ``target`` over ``window``; ``labels`` defaults to
    :func:`ctpa_vq.evaluation.regions.region_labels` of ``target``. Computed on ``device``."""
    window = (float(window[0]), float(window[1]))
    target_hu = target.numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    labels = region_labels(target_hu) if labels is None else labels
    count, abs_sum, sq_sum = region_errors(reconstruction, target, labels, window, device)
    count, abs_sum, sq_sum = (np.pad(a, (0, len(REGIONS) + 1 - len(a))) for a in (count, abs_sum, sq_sum))
    body = slice(OUTSIDE + 1, None)
    n_body = count[body].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        mae = {"body": float(abs_sum[body].sum() / n_body)}
        mae |= {name: float(abs_sum[i + 1] / count[i + 1]) for i, name in enumerate(REGIONS)}
    reconstruction, target = _as_5d(reconstruction), _as_5d(target)
    mask = _as_5d(labels) != OUTSIDE
    ssim_sum, body_ssim_sum = _ssim_sums(reconstruction, target, window, device, SSIM_BLOCK, mask)
    width = window[1] - window[0]
    return ReconstructionMetrics(
        psnr=_psnr(width, sq_sum.sum(), count.sum()),
        ssim=ssim_sum / target.numel(),
        window=window,
        body_psnr=_psnr(width, sq_sum[body].sum(), n_body),
        body_ssim=body_ssim_sum / n_body if n_body else float("nan"),
        mae=mae,
    )
