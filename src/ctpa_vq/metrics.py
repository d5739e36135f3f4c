"""Reconstruction quality in HU: PSNR and 3D SSIM over the model's HU window (torchmetrics).

Both metrics clip the two volumes to the window ``(low, high)`` and use the window width as
the data range, so they measure what the model can represent (what the window clips is
reported separately, see :func:`ctpa_vq.intensity.clipped_fraction`).

Memory: torchmetrics' 3D SSIM (a depthwise 11^3 ``conv3d`` over five stacked products) needs
about 380 bytes of temporaries per voxel on the CPU (measured: +1.5 GiB for a 64x256x256
float32 volume), i.e. about 60 GiB for a 604x512x512 volume. :func:`ssim_hu` therefore runs
torchmetrics on tiles with a halo of half the kernel, keeps only each tile's core of the
returned SSIM map and averages the cores, which equals the whole-volume value (the halo holds
the same real voxels the kernel would see; the volume's own edges are reflected exactly as
torchmetrics does). Peak memory is then that of one tile: about 0.3 GiB for the default
32x128x128 core, whatever the volume size. On 2 CPU cores SSIM runs at about 0.3 M voxels/s
(minutes for a whole CTPA volume); pass ``device="cuda"`` to run the tiles on a GPU.
PSNR accumulates squared errors slab by slab in torchmetrics' ``PeakSignalNoiseRatio``.

Over the body (:mod:`ctpa_vq.regions`): the air around the patient and the out-of-field padding
are reconstructed almost perfectly and inflate whole-volume PSNR/SSIM, so
:func:`reconstruction_metrics` also reports PSNR and SSIM over the body mask of the reference
(SSIM: the same SSIM map, averaged over body voxels only) and the mean absolute HU error per
region (lung, soft tissue, vessel, bone), both volumes clipped to the window first.

No MS-SSIM: torchmetrics' multi-scale SSIM runs 3D only on the whole volume at once (~60 GiB
of temporaries for a 604x512x512 volume) and its default five scales with an 11-voxel kernel
need more than 160 voxels along every axis (a 61-slice chest CT fails at the fifth scale).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from .intensity import DEFAULT_HU_WINDOW
from .regions import OUTSIDE, REGIONS, region_labels

SSIM_SIGMA = 1.5
SSIM_KERNEL = 11  # torchmetrics' defaults; the Gaussian kernel it derives from sigma 1.5 is 11 wide too
_HALO = SSIM_KERNEL // 2
SSIM_BLOCK = (32, 128, 128)  # tile core; with its halo 0.8 M voxels, ~0.3 GiB of torchmetrics temporaries
SLAB = 32  # slices per PSNR update


@dataclass
class ReconstructionMetrics:
    """Quality of a reconstruction against its reference, all in HU over ``window``.

    ``psnr`` (dB) and ``ssim`` cover every voxel; ``body_psnr`` and ``body_ssim`` only the
    reference's body mask; ``mae`` is the mean absolute error (HU) over the body (``"body"``)
    and per region of :data:`ctpa_vq.regions.REGIONS`. Empty masks give NaN.
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


def _blocks(shape: Sequence[int], block: Sequence[int], halo: int):
    """Per block of ``shape``: the slices to read (the core plus ``halo`` each side, inside the
    volume) and, within that, the slices of the core."""
    axes = []
    for size, step in zip(shape, block):
        spans = []
        for core in range(0, size, step):
            core_stop = min(core + step, size)
            start, stop = max(core - halo, 0), min(core_stop + halo, size)
            spans.append((slice(start, stop), slice(core - start, core_stop - start)))
        axes.append(spans)
    for spans in itertools.product(*axes):
        yield tuple(s for s, _ in spans), tuple(c for _, c in spans)


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


def _ssim_sums(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    window: Sequence[float],
    device: torch.device | str,
    block: Sequence[int],
    mask: torch.Tensor | None,
) -> tuple[float, float]:
    """Sum of the 3D SSIM map over all voxels and over ``mask`` (0 without one), tile by tile."""
    _check_pair(reconstruction, target)
    if min(target.shape[2:]) <= _HALO:
        raise ValueError(f"3D SSIM needs more than {_HALO} voxels per axis, got shape {tuple(target.shape[2:])}")
    data_range = (float(window[0]), float(window[1]))
    total = torch.zeros((), dtype=torch.float64, device=device)
    masked = torch.zeros((), dtype=torch.float64, device=device)
    for region, core in _blocks(target.shape[2:], block, _HALO):
        region, core = (slice(None), slice(None), *region), (slice(None), slice(None), *core)
        _, ssim_map = structural_similarity_index_measure(
            reconstruction[region].to(device, torch.float32),
            target[region].to(device, torch.float32),
            sigma=SSIM_SIGMA,
            kernel_size=SSIM_KERNEL,
            data_range=data_range,
            return_full_image=True,
        )
        tile = ssim_map[core]
        total += tile.sum(dtype=torch.float64)
        if mask is not None:
            masked += tile[mask[region][core].to(device)].sum(dtype=torch.float64)
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

    Computed by torchmetrics on ``block``-sized tiles (plus a 5-voxel halo) moved to ``device``
    one at a time; the result equals torchmetrics on the whole volume.
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label of ``labels`` (small non-negative ints, e.g. :func:`ctpa_vq.regions.region_labels`):
    voxel count, sum of absolute and sum of squared HU errors, both volumes clipped to ``window``.

    Returns three float64 arrays of length ``labels.max() + 1``; computed slab by slab.
    """
    reconstruction, target, labels = _as_5d(reconstruction), _as_5d(target), _as_5d(labels)
    _check_pair(reconstruction, target)
    _check_pair(labels, target)
    low, high = float(window[0]), float(window[1])
    size = int(labels.max()) + 1
    count, abs_sum, sq_sum = (torch.zeros(size, dtype=torch.float64) for _ in range(3))
    for start in range(0, target.shape[2], SLAB):
        part = slice(start, start + SLAB)
        error = reconstruction[:, :, part].double().clamp(low, high) - target[:, :, part].double().clamp(low, high)
        index = labels[:, :, part].long().flatten()
        error = error.flatten()
        count += torch.bincount(index, minlength=size).double()
        abs_sum += torch.bincount(index, weights=error.abs(), minlength=size)
        sq_sum += torch.bincount(index, weights=error.square(), minlength=size)
    return count.numpy(), abs_sum.numpy(), sq_sum.numpy()


def reconstruction_metrics(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
    labels: np.ndarray | None = None,
) -> ReconstructionMetrics:
    """Whole-volume and body PSNR/SSIM and per-region MAE of ``reconstruction`` against the
    ``(D, H, W)`` HU volume ``target`` over ``window``; ``labels`` defaults to
    :func:`ctpa_vq.regions.region_labels` of ``target``."""
    window = (float(window[0]), float(window[1]))
    target_hu = target.numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    labels = region_labels(target_hu) if labels is None else labels
    count, abs_sum, sq_sum = region_errors(reconstruction, target, labels, window)
    count, abs_sum, sq_sum = (np.pad(a, (0, len(REGIONS) + 1 - len(a))) for a in (count, abs_sum, sq_sum))
    body = slice(OUTSIDE + 1, None)
    n_body = count[body].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        body_psnr = float(10 * np.log10((window[1] - window[0]) ** 2 / (sq_sum[body].sum() / n_body)))
        mae = {"body": float(abs_sum[body].sum() / n_body)}
        mae |= {name: float(abs_sum[i + 1] / count[i + 1]) for i, name in enumerate(REGIONS)}
    reconstruction, target = _as_5d(reconstruction), _as_5d(target)
    mask = _as_5d(labels) != OUTSIDE
    ssim_sum, body_ssim_sum = _ssim_sums(reconstruction, target, window, device, SSIM_BLOCK, mask)
    return ReconstructionMetrics(
        psnr=psnr_hu(reconstruction, target, window, device),
        ssim=ssim_sum / target.numel(),
        window=window,
        body_psnr=body_psnr if n_body else float("nan"),
        body_ssim=body_ssim_sum / n_body if n_body else float("nan"),
        mae=mae,
    )
