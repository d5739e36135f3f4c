"""One micro-batch of training: the generator step, then the critic step.

Autocast (bf16/fp16 when Accelerate's mixed precision is on) covers the forward passes and the
losses only; backward, gradient clipping and the optimizer steps run outside it. The
reconstruction loss sees the decoder's output in float32 (its last convolution runs in float32).
Neither step reads a tensor on the host: losses stay on the device, non-finite steps are skipped
by the fused optimizer on a device-side flag (see `nonfinite.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..intensity import hu_to_unit
from .losses import dense_weighted_l1, random_slices, ssim_loss
from .setup import TrainingParts


def model_input(parts: TrainingParts, batch: dict) -> torch.Tensor:
    """The generator's input `(B, 1, D, H, W)` in [-1, 1] from a loader batch (the one place that reads it).

    The loader hands out int16 HU (half the bytes of float32, pinned on CUDA); the HU window and
    the conversion to float run here, on the device.
    """
    hu = batch["hu"].to(parts.accelerator.device, non_blocking=True)
    return hu_to_unit(hu, parts.accelerator.unwrap_model(parts.model).config.hu_window)


def dense_threshold(parts: TrainingParts) -> float:
    """`model.dense_threshold_hu` in the model's [-1, 1] window: where the L1's dense weight starts.

    Mapped in NumPy on the host, so the step makes no device round trip for it.
    """
    window = parts.accelerator.unwrap_model(parts.model).config.hu_window
    return float(hu_to_unit(np.float32([parts.config.model.dense_threshold_hu]), window)[0])


@dataclass
class GeneratorOutput:
    """What the critic step needs from the generator step, plus the logged loss terms."""

    terms: dict[str, torch.Tensor]  # detached scalars: the loss, its terms, codebook statistics
    reconstruction: torch.Tensor  # (B, 1, D, H, W), detached
    real_slices: torch.Tensor | None  # (B * n, 1, H, W) when the GAN stage is on
    fake_slices: torch.Tensor | None  # the same slices of the reconstruction, detached


def _grad_norm_and_clip(parts: TrainingParts, module: torch.nn.Module) -> torch.Tensor:
    """The global gradient norm (identical on every process), clipped to `model.grad_clip` if > 0."""
    max_norm = parts.config.model.grad_clip if parts.config.model.grad_clip > 0 else float("inf")
    return parts.accelerator.clip_grad_norm_(module.parameters(), max_norm)


def generator_step(
    parts: TrainingParts, x: torch.Tensor, gan_on: bool, slice_generator: torch.Generator
) -> GeneratorOutput:
    """Forward and backward of the generator on `x` `(B, 1, D, H, W)`; steps `opt_g` on sync micro-batches."""
    accelerator, config, critics = parts.accelerator, parts.config, parts.critics
    gan = config.gan
    real_slices = fake_slices = None
    with accelerator.autocast():
        # A tuple, not the output dataclass, which Accelerate's fp32 output conversion cannot rebuild.
        sample, commitment, perplexity, usage, _ = parts.model(x, return_dict=False)
        reconstruction = sample.float()
        l1 = dense_weighted_l1(reconstruction, x, config.model.dense_weight, dense_threshold(parts))
        terms = {"l1": l1, "commitment": commitment.float()}
        loss = config.model.l1_weight * l1 + terms["commitment"]
        if config.model.ssim_weight > 0:
            terms["ssim"] = ssim_loss(reconstruction, x)
            loss = loss + config.model.ssim_weight * terms["ssim"]
        if gan_on and (parts.perceptual is not None or critics is not None):
            real_slices, fake_slices = random_slices(
                x, reconstruction, n=gan.slices_per_volume, generator=slice_generator
            )
            if parts.perceptual is not None:
                terms["perceptual"] = parts.perceptual(fake_slices, real_slices)
                loss = loss + gan.perceptual_weight * terms["perceptual"]
            if critics is not None:
                critics.requires_grad_(False)
                adversarial, matching = critics.generator_terms(x, reconstruction, real_slices, fake_slices)
                critics.requires_grad_(True)
                terms.update(g_adversarial=adversarial, feature_matching=matching)
                loss = loss + adversarial + gan.feature_matching_weight * matching
    terms["loss"] = loss
    accelerator.backward(parts.guard.poison(loss, terms))
    if accelerator.sync_gradients:
        parts.guard.gate(parts.opt_g, _grad_norm_and_clip(parts, parts.model))
    parts.opt_g.step()
    parts.opt_g.zero_grad(set_to_none=True)
    terms = {name: value.detach() for name, value in terms.items()}
    terms.update(perplexity=perplexity.detach().float(), codebook_usage=usage.detach().float())
    fake_slices = fake_slices.detach() if fake_slices is not None else None
    return GeneratorOutput(terms, reconstruction.detach(), real_slices, fake_slices)


def critic_step(parts: TrainingParts, x: torch.Tensor, generated: GeneratorOutput) -> torch.Tensor:
    """Hinge loss of the critics on `x` vs the detached reconstruction; steps `opt_d` on sync micro-batches."""
    accelerator = parts.accelerator
    with accelerator.autocast():
        d_loss = parts.discriminators(x, generated.reconstruction, generated.real_slices, generated.fake_slices)
    accelerator.backward(parts.guard.poison(d_loss, {"d_loss": d_loss}))
    if accelerator.sync_gradients:
        parts.guard.gate(parts.opt_d, _grad_norm_and_clip(parts, parts.discriminators))
    parts.opt_d.step()
    parts.opt_d.zero_grad(set_to_none=True)
    return d_loss.detach()


def train_micro_batch(parts: TrainingParts, x: torch.Tensor, micro_batch: int) -> dict[str, torch.Tensor]:
    """Generator then critics on one micro-batch (number `micro_batch` of the run); the logged terms."""
    config, accelerator = parts.config, parts.accelerator
    gan_on = parts.state.step >= config.gan.start_step
    # Seeded from (seed, micro-batch, rank), so a resumed run draws the same slices.
    slice_generator = torch.Generator().manual_seed(
        hash((config.training.seed, micro_batch, accelerator.process_index)) % 2**63
    )
    models = [parts.model] + ([parts.discriminators] if parts.discriminators is not None else [])
    with accelerator.accumulate(*models):
        generated = generator_step(parts, x, gan_on, slice_generator)
        terms = generated.terms
        if gan_on and parts.discriminators is not None:
            terms["d_loss"] = critic_step(parts, x, generated)
    return terms
