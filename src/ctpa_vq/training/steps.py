"""One micro-batch of training: the generator step, then the critic step.

The losses (`generator_loss`, `critic_loss`) are functions of the modules and the recipe alone:
the memory trace of `ctpa-vq verify` (`memory.py`) runs the same ones on fake tensors.

Autocast (bf16/fp16 when Accelerate's mixed precision is on) covers the forward passes and the
losses only; backward, gradient clipping and the optimizer steps run outside it. The
reconstruction loss sees the decoder's output in float32 (its last convolution runs in float32).
Neither step reads a tensor on the host: losses stay on the device, non-finite steps are skipped
by the fused optimizer on a device-side flag (see `nonfinite.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from accelerate.utils import extract_model_from_parallel

from ..models.intensity import hu_to_unit
from .config import TrainConfig
from .losses import dense_weighted_l1, random_slices, ssim_loss

if TYPE_CHECKING:  # the memory trace (training/memory.py) calls the losses without the run's set-up
    from .adversarial import Discriminators
    from .perceptual import PerceptualLoss2D
    from .setup import TrainingParts


def model_input(parts: TrainingParts, batch: dict) -> torch.Tensor:
    """The generator's input `(B, 1, D, H, W)` in [-1, 1] from a loader batch (the one place that reads it).

    The loader hands out int16 HU (half the bytes of float32, pinned on CUDA); the HU window and
    the conversion to float run here, on the device.
    """
    hu = batch["hu"].to(parts.accelerator.device, non_blocking=True)
    return hu_to_unit(hu, parts.accelerator.unwrap_model(parts.model).config.hu_window)


def dense_threshold(model: torch.nn.Module, config: TrainConfig) -> float:
    """`model.dense_threshold_hu` in the model's [-1, 1] window: where the L1's dense weight starts.

    Mapped in NumPy on the host, so the step makes no device round trip for it. `model` may be
    wrapped (DDP, torch.compile).
    """
    window = extract_model_from_parallel(model).config.hu_window
    return float(hu_to_unit(np.float32([config.model.dense_threshold_hu]), window)[0])


@dataclass
class GeneratorOutput:
    """The generator's loss on one micro-batch and what the critics' loss needs from it."""

    terms: dict[str, torch.Tensor]  # scalars: "loss" and its terms, as logged
    codebook: dict[str, torch.Tensor]  # scalars: perplexity and codebook_usage (logged, not trained on)
    reconstruction: torch.Tensor  # (B, 1, D, H, W), float32
    real_slices: torch.Tensor | None  # (B * n, 1, H, W) when the GAN stage is on
    fake_slices: torch.Tensor | None  # the same slices of the reconstruction

    @property
    def loss(self) -> torch.Tensor:
        return self.terms["loss"]

    def detach(self) -> GeneratorOutput:
        """The same tensors, cut from the generator's graph."""
        cut = lambda t: t.detach() if t is not None else None  # noqa: E731
        return GeneratorOutput(
            {name: cut(value) for name, value in self.terms.items()},
            {name: cut(value) for name, value in self.codebook.items()},
            cut(self.reconstruction), cut(self.real_slices), cut(self.fake_slices),
        )  # fmt: skip


def generator_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    config: TrainConfig,
    critics: Discriminators | None = None,
    perceptual: PerceptualLoss2D | None = None,
    slice_generator: torch.Generator | None = None,
) -> GeneratorOutput:
    """The generator's loss on `x` `(B, 1, D, H, W)`; training and the memory trace both call it (under autocast).

    L1 and commitment, plus, when given (the GAN stage), the perceptual term and the adversarial and
    feature-matching terms of the `critics` (unwrapped; frozen while they judge, so the generator's
    backward pass leaves their gradients alone) on the same random axial slices.
    """
    gan = config.gan
    # A tuple, not the output dataclass, which Accelerate's fp32 output conversion cannot rebuild.
    sample, commitment, perplexity, usage, _ = model(x, return_dict=False)
    reconstruction = sample.float()
    l1 = dense_weighted_l1(reconstruction, x, config.model.dense_weight, dense_threshold(model, config))
    terms = {"l1": l1, "commitment": commitment.float()}
    loss = config.model.l1_weight * l1 + terms["commitment"]
    if config.model.ssim_weight > 0:
        terms["ssim_loss"] = ssim_loss(reconstruction, x)
        loss = loss + config.model.ssim_weight * terms["ssim_loss"]
    real_slices = fake_slices = None
    if perceptual is not None or critics is not None:
        real_slices, fake_slices = random_slices(x, reconstruction, n=gan.slices_per_volume, generator=slice_generator)
        if perceptual is not None:
            terms["perceptual"] = perceptual(fake_slices, real_slices)
            loss = loss + gan.perceptual_weight * terms["perceptual"]
        if critics is not None:
            critics.requires_grad_(False)
            adversarial, matching = critics.generator_terms(x, reconstruction, real_slices, fake_slices)
            critics.requires_grad_(True)
            terms.update(g_adversarial=adversarial, feature_matching=matching)
            loss = loss + adversarial + gan.feature_matching_weight * matching
    terms["loss"] = loss
    codebook = {"perplexity": perplexity.float(), "codebook_usage": usage.float()}
    return GeneratorOutput(terms, codebook, reconstruction, real_slices, fake_slices)


def critic_loss(discriminators: torch.nn.Module, x: torch.Tensor, generated: GeneratorOutput) -> torch.Tensor:
    """The critics' weighted hinge loss on `x` vs the (detached) reconstruction; training and the memory trace
    both call it (under autocast). `discriminators` may be DDP-wrapped."""
    return discriminators(x, generated.reconstruction, generated.real_slices, generated.fake_slices)


def _grad_norm_and_clip(parts: TrainingParts, module: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """The global gradient norm (identical on every process), clipped to `grad_clip` if > 0."""
    return parts.accelerator.clip_grad_norm_(module.parameters(), grad_clip if grad_clip > 0 else float("inf"))


def generator_step(
    parts: TrainingParts, x: torch.Tensor, gan_on: bool, slice_generator: torch.Generator
) -> GeneratorOutput:
    """Forward and backward of the generator on `x` `(B, 1, D, H, W)`; steps `opt_g` on sync micro-batches."""
    accelerator = parts.accelerator
    with accelerator.autocast():
        generated = generator_loss(
            parts.model, x, parts.config, parts.critics if gan_on else None, parts.perceptual if gan_on else None,
            slice_generator,
        )  # fmt: skip
    accelerator.backward(parts.guard.poison(generated.loss, generated.terms))
    if accelerator.sync_gradients:
        parts.guard.gate(parts.opt_g, _grad_norm_and_clip(parts, parts.model, parts.config.optimizer.grad_clip))
    parts.opt_g.step()
    parts.opt_g.zero_grad(set_to_none=True)
    return generated.detach()


def critic_step(parts: TrainingParts, x: torch.Tensor, generated: GeneratorOutput) -> torch.Tensor:
    """Hinge loss of the critics on `x` vs the detached reconstruction; steps `opt_d` on sync micro-batches."""
    accelerator, grad_clip = parts.accelerator, parts.config.critic_optimizer.grad_clip
    with accelerator.autocast():
        d_loss = critic_loss(parts.discriminators, x, generated)
    accelerator.backward(parts.guard.poison(d_loss, {"d_loss": d_loss}))
    if accelerator.sync_gradients:
        parts.guard.gate(parts.opt_d, _grad_norm_and_clip(parts, parts.discriminators, grad_clip))
    parts.opt_d.step()
    parts.opt_d.zero_grad(set_to_none=True)
    return d_loss.detach()


def train_micro_batch(parts: TrainingParts, x: torch.Tensor, micro_batch: int) -> dict[str, torch.Tensor]:
    """Generator then critics on one micro-batch (number `micro_batch` of the run); the logged terms."""
    config, accelerator = parts.config, parts.accelerator
    gan_on = parts.state.step >= config.gan.start_step
    # On the step's device (slice indices drawn on the host would be copied to the GPU, a host
    # sync every step); seeded from (seed, micro-batch, rank), so a resumed run draws the same slices.
    slice_generator = torch.Generator(device=x.device).manual_seed(
        hash((config.training.seed, micro_batch, accelerator.process_index)) % 2**63
    )
    models = [parts.model] + ([parts.discriminators] if parts.discriminators is not None else [])
    with accelerator.accumulate(*models):
        generated = generator_step(parts, x, gan_on, slice_generator)
        terms = {**generated.terms, **generated.codebook}
        if gan_on and parts.discriminators is not None:
            terms["d_loss"] = critic_step(parts, x, generated)
    return terms
