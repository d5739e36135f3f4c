"""3D convolutional encoder and decoder built from ResBlocks with a choice of normalisation.

`norm_type` (see `NORM_TYPES`):

- ``"group"``: GroupNorm over each input's own content. The output of a patch then depends on
  the statistics of the whole patch, so the same voxel reconstructs differently in different
  inference patches (BENCHMARKS.md, "quality").
- ``"none"``: no normalisation; each ResBlock adds its residual branch times a learned scalar
  that starts at 0 (SkipInit, De & Smith 2020), which keeps the deep stack trainable at the
  recipe's learning rate. Every output voxel depends on its receptive field only, so inference
  is independent of the patch (up to the zero padding at patch borders, which blending hides).
- ``"batch"``: BatchNorm: per-channel statistics of the training batch, their running averages
  at inference, which then does not depend on the patch either.

With ``full_resolution_blocks=False`` level 0 has no ResBlocks: the encoder's input conv is its
first (strided) downsampling and the decoder's output conv a `SubpixelConv3d`, so the
costliest resolution carries two convolutions instead of a stack of them.

Downsampling is per axis: stage ``i`` halves an axis only while that axis still has a factor
of 2 left, so ``downsample_factor=(2, 4, 4)`` keeps more slices than in-plane resolution.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Triple = tuple[int, int, int]
NORM_TYPES = ("group", "none", "batch")


def norm_layer(norm_type: str, num_groups: int, channels: int) -> nn.Module:
    """The normalisation of `norm_type` over `channels` (an identity for ``"none"``)."""
    if norm_type == "group":
        return nn.GroupNorm(num_groups, channels, eps=1e-6)
    if norm_type == "none":
        return nn.Identity()
    if norm_type == "batch":
        return nn.BatchNorm3d(channels, eps=1e-6)
    raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}")

MAX_UPSAMPLE_ELEMENTS = 2**31 - 1
"""The most elements one ``F.interpolate`` call produces: before torch 2.7, CUDA's
``upsample_nearest3d`` indexes with int32 and rejects larger outputs (batch 2 of 128 channels x
128x256x256 is 2^31)."""


def stage_strides(downsample_factor: Sequence[int], num_stages: int) -> list[Triple]:
    """Per-stage strides (each 1 or 2 per axis) whose product is `downsample_factor`.

    >>> stage_strides((4, 4, 2), 2)
    [(2, 2, 2), (2, 2, 1)]
    """
    for factor in downsample_factor:
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"downsample_factor must be powers of 2 per axis, got {tuple(downsample_factor)}")
    needed = max(int(math.log2(f)) for f in downsample_factor)
    if needed != num_stages:
        raise ValueError(
            f"downsample_factor {tuple(downsample_factor)} needs {needed} downsampling stages, "
            f"i.e. len(block_out_channels) == {needed + 1}, got {num_stages + 1}"
        )
    return [tuple(2 if (f >> stage) > 1 else 1 for f in downsample_factor) for stage in range(num_stages)]


class ResBlock3D(nn.Module):
    """Norm -> SiLU -> Conv3d, twice, plus a (1x1x1-projected) skip connection.

    With ``norm_type="none"`` the residual branch is scaled by a learned scalar `residual_scale`
    initialised to 0, so the block starts as its skip connection.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, norm_type: str = "group"):
        super().__init__()
        self.norm1 = norm_layer(norm_type, norm_num_groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm_layer(norm_type, norm_num_groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.residual_scale = nn.Parameter(torch.zeros(())) if norm_type == "none" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + (h if self.residual_scale is None else self.residual_scale * h)


def strided_conv(in_channels: int, out_channels: int, stride: Triple) -> nn.Conv3d:
    """Kernel 4 / stride 2 / padding 1 on halved axes, kernel 3 / stride 1 elsewhere."""
    kernel = tuple(4 if s == 2 else 3 for s in stride)
    return nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=1)


class Downsample3D(nn.Module):
    """A `strided_conv` that keeps the channel count."""

    def __init__(self, channels: int, stride: Triple):
        super().__init__()
        self.conv = strided_conv(channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest-neighbour upsampling by `scale` per axis, then a 3x3x3 conv (no checkerboard)."""

    def __init__(self, channels: int, scale: Triple):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self._upsample(x))

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, D*sD, H*sH, W*sW)``, in batch chunks of at most
        :data:`MAX_UPSAMPLE_ELEMENTS` output elements written into one output tensor."""
        per_sample = math.prod(x.shape[1:]) * math.prod(self.scale)
        chunk = max(1, MAX_UPSAMPLE_ELEMENTS // per_sample)
        if x.shape[0] <= chunk:
            return F.interpolate(x, scale_factor=self.scale, mode="nearest")
        out = x.new_empty((*x.shape[:2], *(n * s for n, s in zip(x.shape[2:], self.scale))))
        for start in range(0, x.shape[0], chunk):  # slices, not split(): autograd lets them be written
            part = x[start : start + chunk]
            out[start : start + chunk] = F.interpolate(part, scale_factor=self.scale, mode="nearest")
        return out


class SubpixelConv3d(nn.Conv3d):
    """A 3x3x3 conv to ``out_channels * sD*sH*sW`` channels, rearranged into a grid `scale` times
    finer (sub-pixel convolution, Shi et al. 2016): `(B, C, d, h, w)` -> `(B, out, d*sD, h*sH, w*sW)`.

    The convolution runs at the coarse resolution. Its sub-grid kernels start as copies of one
    another (ICNR, Aitken et al. 2017), so at initialisation it is nearest-neighbour upsampling
    of one convolution's output: no checkerboard to unlearn.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Triple):
        super().__init__(in_channels, out_channels * math.prod(scale), 3, padding=1)
        self.scale = scale
        self.fine_channels = out_channels
        with torch.no_grad():
            self.weight.copy_(self.weight[:out_channels].repeat_interleave(math.prod(scale), dim=0))
            self.bias.copy_(self.bias[:out_channels].repeat_interleave(math.prod(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (sd, sh, sw), (b, _, d, h, w), c = self.scale, x.shape, self.fine_channels
        y = super().forward(x).view(b, c, sd, sh, sw, d, h, w)
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, d * sd, h * sh, w * sw)


class _CheckpointedStack(nn.Module):
    """Runs `self.stages` in order, each under activation checkpointing when enabled.

    diffusers' `ModelMixin.enable_gradient_checkpointing()` finds modules with a
    `gradient_checkpointing` attribute and sets it together with `_gradient_checkpointing_func`.
    """

    stages: nn.ModuleList

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def _run_stages(self, h: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(stage, h)
            else:
                h = stage(h)
        return h


class Encoder3D(_CheckpointedStack):
    """`(B, in_channels, D, H, W)` -> `(B, out_channels, D/fd, H/fh, W/fw)`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        strides: Sequence[Triple],
        norm_num_groups: int,
        norm_type: str = "group",
        full_resolution_blocks: bool = True,
    ):
        super().__init__()
        channels = block_out_channels[0]
        if full_resolution_blocks:
            self.conv_in = nn.Conv3d(in_channels, channels, 3, padding=1)
        else:  # the input conv is the first downsampling: level 0 has nothing else
            self.conv_in = strided_conv(in_channels, channels, strides[0])
        stages = []
        for level, width in enumerate(block_out_channels):
            if level == 0 and not full_resolution_blocks:
                continue
            layers: list[nn.Module] = []
            for _ in range(layers_per_block):
                layers.append(ResBlock3D(channels, width, norm_num_groups, norm_type))
                channels = width
            if level < len(strides):
                layers.append(Downsample3D(channels, strides[level]))
            stages.append(nn.Sequential(*layers))
        stages.append(nn.Sequential(*(ResBlock3D(channels, channels, norm_num_groups, norm_type) for _ in range(2))))
        self.stages = nn.ModuleList(stages)
        self.norm_out = norm_layer(norm_type, norm_num_groups, channels)
        self.conv_out = nn.Conv3d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._run_stages(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder3D(_CheckpointedStack):
    """`(B, in_channels, d, h, w)` -> `(B, out_channels, d*fd, h*fh, w*fw)`; mirrors `Encoder3D`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        strides: Sequence[Triple],
        norm_num_groups: int,
        norm_type: str = "group",
        full_resolution_blocks: bool = True,
    ):
        super().__init__()
        widths = list(reversed(block_out_channels))
        if not full_resolution_blocks:  # the output conv is the last upsampling: no full-resolution level
            widths = widths[:-1]
        channels = widths[0]
        self.conv_in = nn.Conv3d(in_channels, channels, 3, padding=1)
        stages = [nn.Sequential(*(ResBlock3D(channels, channels, norm_num_groups, norm_type) for _ in range(2)))]
        up_strides = list(reversed(strides))
        for level, width in enumerate(widths):
            layers: list[nn.Module] = []
            for _ in range(layers_per_block + 1):
                layers.append(ResBlock3D(channels, width, norm_num_groups, norm_type))
                channels = width
            if level < len(widths) - 1:
                layers.append(Upsample3D(channels, up_strides[level]))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.norm_out = norm_layer(norm_type, norm_num_groups, channels)
        if full_resolution_blocks:
            self.conv_out = nn.Conv3d(channels, out_channels, 3, padding=1)
        else:
            self.conv_out = SubpixelConv3d(channels, out_channels, up_strides[-1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm_out(self._run_stages(self.conv_in(z))))
        # The output convolution runs in the weights' dtype even under autocast: a bf16 output
        # would quantise soft tissue in steps of several HU (8 bits of mantissa over 3072 HU).
        with torch.autocast(h.device.type, enabled=False):
            return self.conv_out(h.to(self.conv_out.weight.dtype))
