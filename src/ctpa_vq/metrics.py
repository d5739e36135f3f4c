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
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from .intensity import DEFAULT_HU_WINDOW

SSIM_SIGMA = 1.5
SSIM_KERNEL = 11  # torchmetrics' defaults; the Gaussian kernel it derives from sigma 1.5 is 11 wide too
_HALO = SSIM_KERNEL // 2
SSIM_BLOCK = (32, 128, 128)  # tile core; with its halo 0.8 M voxels, ~0.3 GiB of torchmetrics temporaries
SLAB = 32  # slices per PSNR update


@dataclass
class ReconstructionMetrics:
    """PSNR (dB) and SSIM of a reconstruction against its input, both in HU over ``window``."""

    psnr: float
    ssim: float
    window: tuple[float, float]

    def __str__(self) -> str:
        return f"PSNR {self.psnr:.2f} dB, SSIM {self.ssim:.4f} (HU window {self.window[0]:g}..{self.window[1]:g})"


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


def ssim_hu(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
    block: Sequence[int] = SSIM_BLOCK,
) -> float:
    """3D SSIM (Gaussian sigma 1.5, 11^3 kernel) averaged over all voxels; every axis needs > 5 voxels.

    Computed by torchmetrics on ``block``-sized tiles (plus a 5-voxel halo) moved to ``device``
    one at a time; the result equals torchmetrics on the whole volume.
    """
    reconstruction, target = _as_5d(reconstruction), _as_5d(target)
    _check_pair(reconstruction, target)
    if min(target.shape[2:]) <= _HALO:
        raise ValueError(f"3D SSIM needs more than {_HALO} voxels per axis, got shape {tuple(target.shape[2:])}")
    data_range = (float(window[0]), float(window[1]))
    total = torch.zeros((), dtype=torch.float64, device=device)
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
        total += ssim_map[core].sum(dtype=torch.float64)
    return float(total / target.numel())


def reconstruction_metrics(
    reconstruction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window: Sequence[float] = DEFAULT_HU_WINDOW,
    device: torch.device | str = "cpu",
) -> ReconstructionMetrics:
    """PSNR and SSIM of ``reconstruction`` against ``target``, both HU, over ``window``."""
    window = (float(window[0]), float(window[1]))
    return ReconstructionMetrics(
        psnr=psnr_hu(reconstruction, target, window, device),
        ssim=ssim_hu(reconstruction, target, window, device),
        window=window,
    )
