"""Blend weights of overlapping patches: separable 1D profiles and their outer products.

Weights are separable, ``w(d, h, w) = w_d(d) * w_h(h) * w_w(w)``; on a grid that is a
Cartesian product of per-axis origins the sum of all weights at a voxel (the normaliser) is
separable too, so :class:`~ctpa_vq.patching.stitcher.PatchStitcher` normalises 1D profiles
per axis and never builds a weight volume.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from .grid import per_axis

BlendMode = Literal["constant", "linear", "gaussian"]
BLEND_MODES: tuple[str, ...] = ("constant", "linear", "gaussian")
StitchMode = Literal["constant", "linear", "gaussian", "nearest"]
STITCH_MODES: tuple[str, ...] = BLEND_MODES + ("nearest",)
"""Blend modes plus ``nearest``: each voxel taken whole from the patch whose centre is nearest
(0/1 weights), for grids that must not be averaged, such as codebook vectors."""


def blend_profile(length: int, mode: BlendMode, ramp: int = 1, sigma_scale: float = 0.125) -> torch.Tensor:
    """1D blend weights ``(length,)`` in float64, every weight in (0, 1].

    ``constant``: all ones. ``linear``: a trapezoid rising over ``ramp`` voxels at each end
    (two neighbours overlapping by ``ramp`` sum to 1 there). ``gaussian``: centred, sigma =
    ``sigma_scale * length`` (MONAI's default), 1 at the centre, exp(-8) at the ends.
    """
    x = torch.arange(length, dtype=torch.float64)
    if mode == "constant":
        return torch.ones(length, dtype=torch.float64)
    if mode == "linear":
        ramp = max(int(ramp), 1)
        return torch.minimum((x + 1) / (ramp + 1), (length - x) / (ramp + 1)).clamp(max=1.0)
    if mode == "gaussian":
        sigma = sigma_scale * length
        return torch.exp(-0.5 * ((x - (length - 1) / 2) / sigma) ** 2)
    raise ValueError(f"unknown blend mode {mode!r}; choose one of {BLEND_MODES}")


def blend_weights(
    patch_size: Sequence[int], mode: BlendMode, ramp: int | Sequence[int] = 1, sigma_scale: float = 0.125
) -> torch.Tensor:
    """Separable N-D blend weights ``(*patch_size)`` in float32: the outer product of 1D profiles."""
    ramps = per_axis(ramp, len(patch_size), "ramp")
    weights = torch.ones((), dtype=torch.float64)
    for length, r in zip(patch_size, ramps):
        weights = weights[..., None] * blend_profile(length, mode, r, sigma_scale)
    return weights.float()


def nearest_centre_profiles(length: int, origins: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Per origin, 1 where its patch's centre is the nearest (the first one on ties), else 0 (float64)."""
    position = torch.arange(origins[-1] + length, dtype=torch.float64)
    centres = torch.tensor(origins, dtype=torch.float64) + (length - 1) / 2
    owner = (position[:, None] - centres[None]).abs().argmin(dim=1)
    return tuple((owner[o : o + length] == i).double() for i, o in enumerate(origins))


def outer_product(
    profiles: Sequence[Sequence[torch.Tensor]], index: Sequence[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The outer product of one 1D profile per axis, ``profiles[axis][index[axis]]``, written into
    ``out`` when given (reusing one buffer spares a page-faulted allocation per patch)."""
    vectors = [axis[i] for axis, i in zip(profiles, index)]
    trailing = vectors[-1]
    for vector in reversed(vectors[1:-1]):
        trailing = vector[:, None] * trailing[None]
    if len(vectors) == 1:
        return trailing if out is None else out.copy_(trailing)
    return torch.mul(vectors[0].view(-1, *[1] * trailing.ndim), trailing[None], out=out)
