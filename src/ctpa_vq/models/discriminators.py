"""PatchGAN discriminator for 2D slices and 3D volumes (one class, ``spatial_dims`` picks which).

The layout is pix2pix's ``NLayerDiscriminator`` as used by TATS / medicaldiffusion: a stride-2
k4 conv, ``n_layers - 1`` more stride-2 k4 conv blocks doubling the channels (capped at 8x),
one stride-1 k4 block, then a stride-1 k4 conv to one logit per patch.

Normalisation is GroupNorm rather than the reference's BatchNorm: a 256x256x128 CTPA patch
leaves a per-GPU batch of 1 or 2, where batch statistics are noise; BatchNorm's running buffers
also differ between the real and fake passes and need SyncBatchNorm plus buffer broadcasts under
DDP. GroupNorm has no buffers, is independent of the batch (size 1 works) and behaves the same in
train and eval. ``norm_num_groups`` equal to the channel count gives InstanceNorm.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN over ``(B, C, H, W)`` slices (``spatial_dims=2``) or ``(B, C, D, H, W)`` volumes (3).

    ``forward`` returns ``(logits, features)``: patch logits ``(B, 1, *patch_grid)`` and the
    activations after each of the ``n_layers + 1`` blocks, for feature matching.
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        base_channels: int = 64,
        n_layers: int = 3,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d

        def block(c_in: int, c_out: int, stride: int, norm: bool) -> nn.Sequential:
            layers: list[nn.Module] = [conv(c_in, c_out, kernel_size=4, stride=stride, padding=1)]
            if norm:
                layers.append(nn.GroupNorm(min(norm_num_groups, c_out), c_out))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers)

        widths = [base_channels * min(2**i, 8) for i in range(n_layers + 1)]
        blocks = [block(in_channels, widths[0], stride=2, norm=False)]
        blocks += [block(widths[i - 1], widths[i], stride=2, norm=True) for i in range(1, n_layers)]
        blocks.append(block(widths[-2], widths[-1], stride=1, norm=True))
        self.blocks = nn.ModuleList(blocks)
        self.to_logits = conv(widths[-1], 1, kernel_size=4, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x`` ``(B, C, *spatial)`` -> ``(logits (B, 1, *patch_grid), [block activations])``."""
        if x.ndim != self.config.spatial_dims + 2:
            raise ValueError(
                f"{self.config.spatial_dims}D discriminator expects a "
                f"{self.config.spatial_dims + 2}D tensor (B, C, ...), got shape {tuple(x.shape)}"
            )
        smallest = 3 * 2**self.config.n_layers  # each size must stay >= 3 for the two k4 s1 convs
        if min(x.shape[2:]) < smallest:
            raise ValueError(
                f"discriminator with n_layers={self.config.n_layers} needs spatial sizes >= "
                f"{smallest}, got {tuple(x.shape[2:])}"
            )
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.to_logits(x), features
