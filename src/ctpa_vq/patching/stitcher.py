"""The streaming stitcher: run a callable on batches of a grid's patches and blend the outputs.

The callable may change the resolution by a fixed factor per axis, so the same machinery
serves pixels -> pixels (reconstruction), pixels -> latents (encoding, ``output_scale=1/f``)
and latents -> pixels (decoding, ``output_scale=f``).

Seams and memory:

- Each patch is multiplied by *already normalised* weights built from three 1D vectors
  (:mod:`~ctpa_vq.patching.blend`), and the accumulated output is the final result: there is
  no weight/count volume and no final division pass. With an identity callable the output
  equals the input up to float rounding, for every blend mode.
- A model whose output is off by a different constant in each patch leaves ramps, not steps:
  the steepest voxel step is 1 / (overlap + 1) of the constants' spread for ``linear`` and
  tanh(stride / (4 sigma^2)) for ``gaussian`` (sigma = patch / 8): for a (128, 256, 256)
  patch with 25% overlap, 9% along D and 5% along H and W. ``constant`` keeps the full jump.
- Peak memory is the output volume plus one batch of patches (two host-side staging
  batches when patches run on a GPU and the output lives on the CPU,
  :class:`~ctpa_vq.patching.host_buffers.HostBuffers`), whatever the number of patches. The
  input is never padded or copied as a whole: patches are gathered by slicing, and only
  patches that reach past the edge are padded (replicate) one by one.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from .blend import STITCH_MODES, StitchMode, blend_profile, nearest_centre_profiles, outer_product
from .grid import PatchGrid, per_axis
from .host_buffers import HostBuffers

PatchFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps a batch of patches ``(B, C_in, *patch_size)`` to ``(B, C_out, *patch_size * output_scale)``."""


class SupportsUpdate(Protocol):
    """A progress bar (tqdm) advanced by the number of patches done."""

    def update(self, n: int) -> object: ...


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
        scales = tuple(Fraction(s).limit_denominator(1 << 16) for s in per_axis(output_scale, ndim, "output_scale"))
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
            return nearest_centre_profiles(length, origins)
        profile = blend_profile(length, self.blend, ramp, sigma_scale)
        total = torch.zeros(origins[-1] + length, dtype=torch.float64)
        for o in origins:
            total[o : o + length] += profile
        return tuple(profile / total[o : o + length] for o in origins)

    def patch_weights(self, index: Sequence[int]) -> torch.Tensor:
        """Normalised blend weights ``(*output_patch_size)`` (float64) of the patch at grid index ``index``."""
        return outer_product(self.axis_weights, index)

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
                out[target].addcmul_(patches[b][(slice(None), *source)], outer_product(profiles, index, weights)[source])

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
        upload = HostBuffers(pinned=device.type == "cuda" and volume.device.type == "cpu", device=device)
        download = HostBuffers(pinned=device.type == "cuda" and out_device.type == "cpu", device=device)
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
                    result[b].mul_(outer_product(profiles, index, weights))
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
