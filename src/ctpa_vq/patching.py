"""Patch-wise processing of whole volumes: the patch grid, blend weights and a streaming stitcher.

A :class:`PatchGrid` tiles a volume of any shape with overlapping patches; a
:class:`PatchStitcher` runs a callable on batches of those patches and blends its outputs
into one preallocated output volume. The callable may change the resolution by a fixed
factor per axis, so the same machinery serves pixels -> pixels (reconstruction), pixels ->
latents (encoding, ``output_scale=1/f``) and latents -> pixels (decoding, ``output_scale=f``).

Seams and memory:

- Blend weights are separable, ``w(d, h, w) = w_d(d) * w_h(h) * w_w(w)``, and the grid is a
  Cartesian product of per-axis origins, so the sum of all weights at a voxel (the
  normaliser) is separable too. Each patch is therefore multiplied by *already normalised*
  weights built from three 1D vectors, and the accumulated output is the final result:
  there is no weight/count volume and no final division pass. With an identity callable
  the output equals the input up to float rounding, for every blend mode.
- A model whose output is off by a different constant in each patch leaves ramps, not steps:
  the steepest voxel step is 1 / (overlap + 1) of the constants' spread for ``linear`` and
  tanh(stride / (4 sigma^2)) for ``gaussian`` (sigma = patch / 8): for the default
  (128, 256, 256) patch with 25% overlap, 9% along D and 5% along H and W. ``constant``
  keeps the full jump.
- Peak memory is the output volume plus one batch of patches (two host-side staging
  batches when patches run on a GPU and the output lives on the CPU), whatever the number
  of patches. The input is never padded or copied as a whole: patches are gathered by
  slicing, and only patches that reach past the edge are padded (replicate) one by one.

For a 604 x 512 x 512 (D, H, W) CTPA volume, the default (128, 256, 256) patch with 25%
overlap gives 6 x 3 x 3 = 54 patches (strides 96, 192, 192).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Callable, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F

BlendMode = Literal["constant", "linear", "gaussian"]
BLEND_MODES: tuple[str, ...] = ("constant", "linear", "gaussian")
StitchMode = Literal["constant", "linear", "gaussian", "nearest"]
STITCH_MODES: tuple[str, ...] = BLEND_MODES + ("nearest",)
"""Blend modes plus ``nearest``: each voxel taken whole from the patch whose centre is nearest
(0/1 weights), for grids that must not be averaged, such as codebook vectors."""

PatchFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of patches ``(B, C_in, *patch_size)`` to ``(B, C_out, *patch_size * output_scale)``."""


class SupportsUpdate(Protocol):
    """A progress bar (tqdm) advanced by the number of patches done."""

    def update(self, n: int) -> object: ...


def _per_axis(value, ndim: int, name: str) -> tuple:
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
        self.patch_size = tuple(int(p) for p in _per_axis(patch_size, ndim, "patch_size"))
        self.align = tuple(int(a) for a in _per_axis(align, ndim, "align"))
        overlaps = _per_axis(overlap, ndim, "overlap")
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
) -> PatchGrid:
    """The patch grid that runs the fewest voxels through a model, within a memory budget per patch.

    Per axis, ``n`` patches overlapping by ``overlap`` voxels need patches of at least
    ``(L + (n - 1) * overlap) / n`` (``L``: the axis rounded up to ``align``), rounded up to
    ``align``; one patch needs no overlap at all. Of all per-axis choices whose patch holds at
    most ``max_patch_voxels``, the one with the fewest voxels run wins (ties: fewer patches).
    E.g. 133 x 512 x 512 with align 4 fits one 136-deep patch along D when the budget allows.

    Args:
        volume_shape: spatial shape of the volume.
        max_patch_voxels: the most voxels one patch may hold (the memory budget).
        overlap: per axis, voxels that neighbouring patches must share (rounded up to ``align``).
        align: per axis, the multiple that patch sizes and origins must respect (a model's
            downsampling factor).
    """
    shape = tuple(int(s) for s in volume_shape)
    ndim = len(shape)
    aligns = tuple(int(a) for a in _per_axis(align, ndim, "align"))
    overlaps = tuple(-(-int(o) // a) * a for o, a in zip(_per_axis(overlap, ndim, "overlap"), aligns))
    if min(shape, default=0) < 1 or min(aligns) < 1 or min(overlaps) < 0:
        raise ValueError(f"need a positive volume shape {shape}, align {aligns} and non-negative overlap {overlaps}")
    per_axis = [_axis_options(-(-s // a) * a, o, a) for s, o, a in zip(shape, overlaps, aligns)]
    best: tuple[int, int, tuple[int, ...]] | None = None
    for choice in itertools.product(*per_axis):
        voxels = math.prod(p for _, p in choice)
        if voxels > max_patch_voxels:
            continue
        work = math.prod(w for w, _ in choice)
        key = (work, -voxels, tuple(p for _, p in choice))
        if best is None or key < best:
            best = key
    if best is None:
        smallest = math.prod(min(p for _, p in axis) for axis in per_axis)
        raise ValueError(
            f"no patch grid for volume {shape} fits {max_patch_voxels} voxels per patch with overlap {overlaps} "
            f"and align {aligns}: the smallest patch holds {smallest} voxels"
        )
    lengths = [-(-s // a) * a for s, a in zip(shape, aligns)]
    return PatchGrid(shape, best[2], [o if p < n else 0 for o, p, n in zip(overlaps, best[2], lengths)], aligns)


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
    ramps = _per_axis(ramp, len(patch_size), "ramp")
    weights = torch.ones((), dtype=torch.float64)
    for length, r in zip(patch_size, ramps):
        weights = weights[..., None] * blend_profile(length, mode, r, sigma_scale)
    return weights.float()


def _scaled(n: int, scale: Fraction, what: str) -> int:
    value = n * scale
    if value.denominator != 1:
        raise ValueError(f"{what} {n} times output scale {scale} is not an integer; align the grid to the scale")
    return int(value)


class PatchStitcher:
    """Blend the outputs of a patch callable over a :class:`PatchGrid` into one volume.

    Args:
        grid: the patch grid over the *input* volume.
        blend: ``"gaussian"`` (default), ``"linear"``, ``"constant"`` or ``"nearest"`` (no
            averaging: each output voxel is the output of the patch whose centre is nearest).
        output_scale: per axis, output voxels per input voxel (e.g. ``1/4`` for an encoder
            with downsampling 4, ``4`` for its decoder); floats are read as fractions.
        output_shape: spatial shape of the result; default ``volume_shape * output_scale``
            rounded up. Patch outputs reaching past it are cropped.
        sigma_scale: gaussian sigma as a fraction of the output patch size.
    """

    def __init__(
        self,
        grid: PatchGrid,
        blend: StitchMode = "gaussian",
        output_scale: float | Fraction | Sequence[float | Fraction] = 1,
        output_shape: Sequence[int] | None = None,
        sigma_scale: float = 0.125,
    ) -> None:
        if blend not in STITCH_MODES:
            raise ValueError(f"unknown blend mode {blend!r}; choose one of {STITCH_MODES}")
        ndim = len(grid.volume_shape)
        scales = tuple(Fraction(s).limit_denominator(1 << 16) for s in _per_axis(output_scale, ndim, "output_scale"))
        if min(scales) <= 0:
            raise ValueError(f"output scale must be positive, got {output_scale}")
        self.grid = grid
        self.blend = blend
        self.output_scale = scales
        self.output_patch_size = tuple(_scaled(p, s, "patch size") for p, s in zip(grid.patch_size, scales))
        self.output_axis_origins = tuple(
            tuple(_scaled(o, s, "patch origin") for o in axis) for axis, s in zip(grid.axis_origins, scales)
        )
        if output_shape is None:
            output_shape = tuple(math.ceil(n * s) for n, s in zip(grid.volume_shape, scales))
        self.output_shape = tuple(int(n) for n in output_shape)
        if len(self.output_shape) != ndim:
            raise ValueError(f"output shape {self.output_shape} must have {ndim} axes")
        self.axis_weights = tuple(
            self._normalised_profiles(q, origins, _scaled(p - st, s, "overlap") if p > st else 0, sigma_scale)
            for q, origins, p, st, s in zip(
                self.output_patch_size, self.output_axis_origins, grid.patch_size, grid.stride, scales
            )
        )

    def _normalised_profiles(
        self, length: int, origins: tuple[int, ...], ramp: int, sigma_scale: float
    ) -> tuple[torch.Tensor, ...]:
        """Per origin, the 1D profile divided by the sum of all profiles over that axis (float64)."""
        if self.blend == "nearest":
            return _nearest_centre_profiles(length, origins)
        profile = blend_profile(length, self.blend, ramp, sigma_scale)
        total = torch.zeros(origins[-1] + length, dtype=torch.float64)
        for o in origins:
            total[o : o + length] += profile
        return tuple(profile / total[o : o + length] for o in origins)

    def patch_weights(self, index: Sequence[int]) -> torch.Tensor:
        """Normalised blend weights ``(*output_patch_size)`` (float64) of the patch at grid index ``index``."""
        return _outer(self.axis_weights, index)

    def _slice(self, volume: torch.Tensor, origin: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
        """The part of the patch at ``origin`` inside ``volume`` (a view) and what is missing per axis."""
        stops = [min(o + p, n) for o, p, n in zip(origin, self.grid.patch_size, self.grid.volume_shape)]
        view = volume[(slice(None), *(slice(o, e) for o, e in zip(origin, stops)))]
        return view, [o + p - e for o, p, e in zip(origin, self.grid.patch_size, stops)]

    def _gather(self, volume: torch.Tensor, origins: Sequence[tuple[int, ...]], out: torch.Tensor) -> None:
        """Copy the patches at ``origins`` of ``volume`` (C, *S) into ``out`` (B, C, *P), padding at the edge."""
        for b, origin in enumerate(origins):
            patch, missing = self._slice(volume, origin)
            if any(missing):
                pad = [v for m in reversed(missing) for v in (0, m)]
                patch = F.pad(patch[None] if patch.is_floating_point() else patch[None].float(), pad, "replicate")[0]
            out[b].copy_(patch)

    def _accumulate(
        self,
        out: torch.Tensor,
        patches: torch.Tensor,
        indices: Sequence[tuple[int, ...]],
        profiles: Sequence[Sequence[torch.Tensor]] | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add patches ``(B, C, *Q)`` into ``out`` ``(C, *output_shape)``, cropped to its bounds;
        weighted on the way (one fused pass) with ``profiles`` (built in the ``weights`` buffer),
        or already weighted if None."""
        for b, index in enumerate(indices):
            starts = [axis[i] for axis, i in zip(self.output_axis_origins, index)]
            stops = [min(s + q, n) for s, q, n in zip(starts, self.output_patch_size, self.output_shape)]
            target = (slice(None), *(slice(s, e) for s, e in zip(starts, stops)))
            source = tuple(slice(0, e - s) for s, e in zip(starts, stops))
            if profiles is None:
                out[target].add_(patches[b][(slice(None), *source)])
            else:
                out[target].addcmul_(patches[b][(slice(None), *source)], _outer(profiles, index, weights)[source])

    @torch.inference_mode()
    def __call__(
        self,
        fn: PatchFn,
        volume: torch.Tensor,
        *,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        out_device: torch.device | str | None = None,
        out_dtype: torch.dtype = torch.float32,
        progress: SupportsUpdate | None = None,
        side: "PatchStitcher | None" = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run ``fn`` on every patch of ``volume`` and return the blended output.

        Args:
            fn: batch of patches ``(B, C_in, *patch_size)`` on ``device`` -> ``(B, C_out, *output_patch_size)``.
                Its input may be a view of ``volume``: it must not write to it. Its output may be
                weighted in place (when it is copied from a GPU to the host).
            volume: ``(C_in, *grid.volume_shape)``; stays where it is (patches are sliced out).
            batch_size: patches per call of ``fn``.
            device, dtype: where and in which dtype patches are fed to ``fn`` (default: the volume's).
            out_device: where the output lives (default: the volume's device), e.g. the CPU while
                ``fn`` runs on a GPU.
            out_dtype: dtype of the output and of the blending arithmetic.
            progress: advanced by the number of patches after each batch.
            side: a second stitcher over the same grid (its own output scale and blend) for a
                second output of ``fn``, which then returns ``(output, side_output)``: e.g. the
                latents of a per-patch forward, kept at no extra model cost.

        Returns:
            ``(C_out, *output_shape)`` on ``out_device``; with ``side``, also its output.
        """
        if side is not None and (side.grid.volume_shape, side.grid.axis_origins) != (
            self.grid.volume_shape, self.grid.axis_origins
        ):
            raise ValueError("the side stitcher must use the same patch grid")
        if volume.ndim != len(self.grid.volume_shape) + 1 or tuple(volume.shape[1:]) != self.grid.volume_shape:
            raise ValueError(f"volume of shape {tuple(volume.shape)} does not match (C, *{self.grid.volume_shape})")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        device = torch.device(device) if device is not None else volume.device
        out_device = torch.device(out_device) if out_device is not None else volume.device
        dtype = dtype or volume.dtype
        # Host <-> GPU copies go through two alternating pinned buffers, so that the host gathers
        # and accumulates one batch while the GPU computes the next.
        upload = _HostBuffers(pinned=device.type == "cuda" and volume.device.type == "cpu")
        download = _HostBuffers(pinned=device.type == "cuda" and out_device.type == "cpu")
        # Weights are applied where the patch output is: on the device before a download, else
        # fused into the accumulation on the output's device.
        weight_device = device if download.pinned else out_device
        profiles = [[w.to(weight_device, out_dtype) for w in axis] for axis in self.axis_weights]
        weights = torch.empty(self.output_patch_size, dtype=out_dtype, device=weight_device)
        indices = list(itertools.product(*(range(n) for n in self.grid.grid_shape)))
        staged: torch.Tensor | None = None
        out: torch.Tensor | None = None
        side_out: torch.Tensor | None = None
        if side is not None:
            side_profiles = [[w.to(out_device, out_dtype) for w in axis] for axis in side.axis_weights]
            side_weights = torch.empty(side.output_patch_size, dtype=out_dtype, device=out_device)
        pending: tuple[int, torch.Tensor, list] | None = None

        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            origins = [tuple(axis[i] for axis, i in zip(self.grid.axis_origins, index)) for index in batch]
            shape = (len(batch), volume.shape[0], *self.grid.patch_size)
            if upload.pinned:
                slot, host = upload.next(shape, volume.dtype)
                self._gather(volume, origins, host)
                patches = host.to(device, non_blocking=True)
                upload.mark(slot)
            else:
                view, missing = self._slice(volume, origins[0])
                if len(batch) == 1 and not any(missing) and not download.pinned:
                    patches = view[None].to(device)  # a view of the volume: no copy
                else:
                    if staged is None:
                        staged = torch.empty(shape, dtype=volume.dtype, device=volume.device)
                    self._gather(volume, origins, staged[: len(batch)])
                    patches = staged[: len(batch)].to(device)

            result = fn(patches.to(dtype))
            if side is not None:
                result, side_result = result
                if side_out is None:
                    side_shape = (side_result.shape[1], *side.output_shape)
                    side_out = torch.zeros(side_shape, dtype=out_dtype, device=out_device)
                side._accumulate(side_out, side_result.to(out_device, out_dtype), batch, side_profiles, side_weights)
                del side_result
            expected = (len(batch), *self.output_patch_size)
            if result.ndim != len(expected) + 1 or (result.shape[0], *result.shape[2:]) != expected:
                raise ValueError(f"patch function returned {tuple(result.shape)}, expected (B, C, ...) = {expected}")
            if out is None:
                out = torch.zeros((result.shape[1], *self.output_shape), dtype=out_dtype, device=out_device)

            if download.pinned:
                result = result.to(out_dtype)
                for b, index in enumerate(batch):
                    result[b].mul_(_outer(profiles, index, weights))
                slot, host = download.next(tuple(result.shape), out_dtype)
                host.copy_(result, non_blocking=True)
                download.mark(slot)
                if pending is not None:  # accumulate batch k-1 while the GPU computes batch k
                    self._accumulate(out, download.wait(pending[0], pending[1]), pending[2])
                pending = (slot, host, batch)
            else:
                self._accumulate(out, result.to(out_device, out_dtype), batch, profiles, weights)
            del patches, result  # free this batch on the device before the next one is computed
            if progress is not None:
                progress.update(len(batch))
        if pending is not None:
            self._accumulate(out, download.wait(pending[0], pending[1]), pending[2])
        assert out is not None
        return out if side is None else (out, side_out)


def _nearest_centre_profiles(length: int, origins: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Per origin, 1 where its patch's centre is the nearest (the first one on ties), else 0 (float64)."""
    position = torch.arange(origins[-1] + length, dtype=torch.float64)
    centres = torch.tensor(origins, dtype=torch.float64) + (length - 1) / 2
    owner = (position[:, None] - centres[None]).abs().argmin(dim=1)
    return tuple((owner[o : o + length] == i).double() for i, o in enumerate(origins))


def _outer(
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


class _HostBuffers:
    """Two alternating host buffers for asynchronous copies to or from a GPU.

    Pinned memory makes ``non_blocking`` copies truly asynchronous; an event per buffer keeps a
    buffer from being refilled, or read, before the copy that last used it has finished.
    """

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def next(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        slot, self.turn = self.turn, self.turn ^ 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        buf = self.buffers[slot]
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self.buffers[slot] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return slot, buf[: shape[0]]

    def mark(self, slot: int) -> None:
        """Record that the copy just issued on the current stream uses buffer ``slot``."""
        event = self.events[slot] = torch.cuda.Event()
        event.record()

    def wait(self, slot: int, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` once the copy into buffer ``slot`` has finished."""
        self.events[slot].synchronize()
        return buf
