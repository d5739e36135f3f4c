"""The two PatchGAN critics of the staged recipe, behind one module so DDP wraps them once.

`forward` is the discriminator's own hinge loss (called through the DDP wrapper, on detached
fakes). `generator_terms` is what the generator is trained against; the training loop calls it
on the *unwrapped* module with its parameters frozen, so the generator's backward pass never
enters the discriminator's DDP reducer (no unused-parameter errors, no wasted all-reduce).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models import PatchDiscriminator
from .config import GANConfig
from .losses import feature_matching_loss, hinge_discriminator_loss, hinge_generator_loss


class Discriminators(nn.Module):
    """A 2D critic on axial slices and/or a 3D critic on whole patches, with their weights.

    Volumes are `(B, 1, D, H, W)`; slices `(B * n, 1, H, W)` (the same slices of real and fake).
    """

    def __init__(
        self, image_gan_weight: float, volume_gan_weight: float, base_channels: int = 64, n_layers: int = 3
    ):
        super().__init__()
        self.image_gan_weight = image_gan_weight
        self.volume_gan_weight = volume_gan_weight
        self.image = PatchDiscriminator(2, 1, base_channels, n_layers) if image_gan_weight > 0 else None
        self.volume = PatchDiscriminator(3, 1, base_channels, n_layers) if volume_gan_weight > 0 else None

    @classmethod
    def from_gan_config(cls, gan: GANConfig) -> Discriminators:
        """The critics of the recipe's `gan` section (the same names, one for one)."""
        return cls(gan.image_gan_weight, gan.volume_gan_weight, gan.base_channels, gan.n_layers)

    def _critics(self):
        if self.image is not None:
            yield self.image, self.image_gan_weight, "slices"
        if self.volume is not None:
            yield self.volume, self.volume_gan_weight, "volumes"

    def forward(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_slices: torch.Tensor,
        fake_slices: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted hinge loss of the critics on real vs (detached) fake inputs."""
        inputs = {"slices": (real_slices, fake_slices), "volumes": (real, fake)}
        loss = real.new_zeros((), dtype=torch.float32)
        for critic, weight, kind in self._critics():
            real_in, fake_in = inputs[kind]
            loss = loss + weight * hinge_discriminator_loss(critic(real_in)[0], critic(fake_in.detach())[0])
        return loss

    def generator_terms(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_slices: torch.Tensor,
        fake_slices: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted adversarial loss, weighted feature-matching loss) for the generator."""
        inputs = {"slices": (real_slices, fake_slices), "volumes": (real, fake)}
        adversarial = real.new_zeros((), dtype=torch.float32)
        matching = real.new_zeros((), dtype=torch.float32)
        for critic, weight, kind in self._critics():
            real_in, fake_in = inputs[kind]
            with torch.no_grad():
                _, real_features = critic(real_in)
            fake_logits, fake_features = critic(fake_in)
            adversarial = adversarial + weight * hinge_generator_loss(fake_logits)
            matching = matching + weight * feature_matching_loss(real_features, fake_features)
        return adversarial, matching
