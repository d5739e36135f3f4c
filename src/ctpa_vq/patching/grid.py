"""The patch grid: overlapping patches that tile a volume of any shape, fixed or planned.

A :class:`PatchGrid` is a Cartesian product of per-axis patch origins (the last patch on each
axis clamped to the edge, so every voxel is covered); :func:`plan_grid` chooses the patch
sizes that run the fewest voxels through a model within a memory budget per patch.

For a 604 x 512 x 512 (D, H, W) CTPA volume, a fixed (128, 256, 256) patch with 25% overlap
gives 6 x 3 x 3 = 54 patches (strides 96, 192, 192).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Sequence


def per_axis(value, ndim: int, name: str) -> tuple:
    """``value`` repeated ``ndim`` times if a scalar, else checked to have one entry per axis."""
    if isinstance(value, (int, float, Fraction)):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per axis), got {value}")
    return value


def _overlap_voxels(overlap: float | int, patch: int) -> int:
    """``overlap`` is a fraction in [0, 1) when a float, a voxel count when an int."""
    if isinstance(overlap, float):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"fractional overlap must be in [0, 1), got {overlap}")
        # Same rounding as MONAI's scan interval int(patch * (1 - overlap)).
        return patch - max(int(patch * (1.0 - overlap)), 1)
    if not 0 <= overlap < patch:
        raise ValueError(f"overlap of {overlap} voxels must be in [0, patch size {patch})")
    return int(overlap)


class PatchGrid:
    """Overlapping patches covering a volume of shape ``volume_shape`` (e.g. (D, H, W)).

    Per axis: the volume is conceptually padded at the end to ``padded_shape`` (at least
    one patch, and a multiple of ``align``); origins step by ``stride`` (a multiple of
    ``align``) and the last patch is clamped to the padded edge, so every voxel is covered
    and no patch is dropped. With ``align`` equal to a model's downsampling factor, every
    origin, patch size and padded size is a multiple of it, so the latent patches of an
    encoder tile the latent grid of the padded volume exactly.

    Args:
        volume_shape: spatial shape of the volume.
        patch_size: patch size per axis (an int for all axes).
        overlap: per axis, a fraction of the patch in [0, 1) (float) or a voxel count (int).
        align: per axis, the multiple that origins, patch sizes and padding must respect.
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        patch_size: int | Sequence[int],
        overlap: float | int | Sequence[float | int] = 0.25,
        align: int | Sequence[int] = 1,
    ) -> None:
        self.volume_shape = tuple(int(s) for s in volume_shape)
        ndim = len(self.volume_shape)
        self.patch_size = tuple(int(p) for p in per_axis(patch_size, ndim, "patch_size"))
        self.align = tuple(int(a) for a in per_axis(align, ndim, "align"))
        overlaps = per_axis(overlap, ndim, "overlap")
        if min(self.volume_shape, default=0) < 1:
            raise ValueError(f"volume shape must be positive, got {self.volume_shape}")
        for p, a in zip(self.patch_size, self.align):
            if a < 1 or p < 1 or p % a:
                raise ValueError(f"patch size {self.patch_size} must be positive multiples of align {self.align}")

        strides, padded, origins = [], [], []
        for size, p, o, a in zip(self.volume_shape, self.patch_size, overlaps, self.align):
            stride = max((p - _overlap_voxels(o, p)) // a * a, a)
            length = max(p, math.ceil(size / a) * a)
            count = math.ceil((length - p) / stride) + 1
            strides.append(stride)
            padded.append(length)
            origins.append(tuple(min(i * stride, length - p) for i in range(count)))
        self.stride = tuple(strides)
        self.padded_shape = tuple(padded)
        self.axis_origins: tuple[tuple[int, ...], ...] = tuple(origins)

    @property
    def origins(self) -> list[tuple[int, ...]]:
        """Patch start corners, first axis slowest."""
        return list(itertools.product(*self.axis_origins))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of patches along each axis."""
        return tuple(len(o) for o in self.axis_origins)

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def work_multiplier(self) -> float:
        """Voxels run through the model (patches x patch voxels) per voxel of the volume."""
        return len(self) * math.prod(self.patch_size) / math.prod(self.volume_shape)

    def describe(self) -> str:
        """One line for users, e.g. ``6 x 2 x 2 = 24 patches of 116 x 264 x 264 voxels, 1.22x the volume's voxels``."""
        counts = " x ".join(map(str, self.grid_shape))
        patch = " x ".join(map(str, self.patch_size))
        return f"{counts} = {len(self)} patches of {patch} voxels, {self.work_multiplier:.2f}x the volume's voxels"

    def __repr__(self) -> str:
        return (
            f"PatchGrid(volume_shape={self.volume_shape}, patch_size={self.patch_size}, stride={self.stride}, "
            f"align={self.align}, grid_shape={self.grid_shape}, patches={len(self)})"
        )


def _axis_options(length: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """``(voxels run, patch size)`` along one axis of padded ``length``, one per patch count,
    each with the smallest aligned patch that ``count`` patches overlapping by ``overlap`` need."""
    options, seen = [], set()
    for count in range(1, length // align + 1):
        patch = length if count == 1 else -(-(length + (count - 1) * overlap) // (count * align)) * align
        if count > 1 and patch - overlap < align:
            break
        if patch in seen:
            continue
        seen.add(patch)
        actual = 1 if patch == length else math.ceil((length - patch) / (patch - overlap)) + 1
        options.append((actual * patch, patch))
    return options


def plan_grid(
    volume_shape: Sequence[int],
    max_patch_voxels: int,
    overlap: int | Sequence[int] = 0,
    align: int | Sequence[int] = 1,
    keep_whole: Sequence[int] = (),
) -> PatchGrid:
    """The patch grid that runs the fewest voxels through a model, within a memory budget per patch.

    Per axis, ``n`` patches overlapping by ``overlap`` voxels need patches of at least
    ``(L + (n - 1) * overlap) / n`` (``L``: the axis rounded up to ``align``), rounded up to
    ``align``; one patch needs no overlap at all. Of all per-axis choices whose patch holds at
    most ``max_patch_voxels``, the one with the fewest voxels run wins (ties: fewer patches, then
    fewer patches along ``keep_whole[0]``, then ``keep_whole[1]``, ...).
    E.g. 133 x 512 x 512 with align 4 fits one 136-deep patch along D when the budget allows.

    Args:
        volume_shape: spatial shape of the volume.
        max_patch_voxels: the most voxels one patch may hold (the memory budget).
        overlap: per axis, voxels that neighbouring patches must share (rounded up to ``align``).
        align: per axis, the multiple that patch sizes and origins must respect (a model's
            downsampling factor).
        keep_whole: axes to cut last among equally cheap grids, the one to keep whole first.
    """
    shape = tuple(int(s) for s in volume_shape)
    ndim = len(shape)
    aligns = tuple(int(a) for a in per_axis(align, ndim, "align"))
    overlaps = tuple(-(-int(o) // a) * a for o, a in zip(per_axis(overlap, ndim, "overlap"), aligns))
    if min(shape, default=0) < 1 or min(aligns) < 1 or min(overlaps) < 0:
        raise ValueError(f"need a positive volume shape {shape}, align {aligns} and non-negative overlap {overlaps}")
    options = [_axis_options(-(-s // a) * a, o, a) for s, o, a in zip(shape, overlaps, aligns)]
    best: tuple | None = None
    for choice in itertools.product(*options):
        voxels = math.prod(p for _, p in choice)
        if voxels > max_patch_voxels:
            continue
        work = math.prod(w for w, _ in choice)
        counts = [w // p for w, p in choice]
        key = (work, -voxels, *(counts[axis] for axis in keep_whole), tuple(p for _, p in choice))
        if best is None or key < best:
            best = key
    if best is None:
        smallest = math.prod(min(p for _, p in axis) for axis in options)
        raise ValueError(
            f"no patch grid for volume {shape} fits {max_patch_voxels} voxels per patch with overlap {overlaps} "
            f"and align {aligns}: the smallest patch holds {smallest} voxels"
        )
    lengths = [-(-s // a) * a for s, a in zip(shape, aligns)]
    patch = best[-1]
    return PatchGrid(shape, patch, [o if p < n else 0 for o, p, n in zip(overlaps, patch, lengths)], aligns)
