"""Training losses: the dense-voxel weighted L1, hinge GAN losses, feature matching, random axial slices.

The reconstruction term is L1 in the [-1, 1] window, optionally with the voxels at or above a
threshold (contrast-enhanced vessels and bone, under 1% of a chest CT's body) weighted more: an
unweighted L1 over whole patches barely sees them. The adversarial recipe is TATS / medicaldiffusion's: a 2D discriminator on random axial slices and a 3D one
on the whole patch, both with hinge loss, plus L1 feature matching between their activations on
real and reconstructed inputs (the perceptual distance on the same slices is `perceptual.py`).
Weights and the step each term starts at belong to the training config; these are plain
functions of tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def dense_weighted_l1(
    reconstruction: torch.Tensor, target: torch.Tensor, dense_weight: float, threshold: float
) -> torch.Tensor:
    """L1 with each voxel whose ``target >= threshold`` weighted ``dense_weight`` (the others 1).

    Normalised by the mean weight, so it is a weighted mean absolute error on the scale of the
    plain L1 (which it equals at ``dense_weight == 1``); ``threshold`` is in ``target``'s units.
    Any matching shapes, e.g. ``(B, 1, D, H, W)`` in [-1, 1].
    """
    if dense_weight <= 0:
        raise ValueError(f"dense_weight must be > 0, got {dense_weight}")
    error = (reconstruction - target).abs()
    if dense_weight == 1:
        return error.mean()
    weight = torch.where(target >= threshold, dense_weight, 1.0).to(error.dtype)
    return (error * weight).sum() / weight.sum()


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - real) + mean relu(1 + fake))``; zero once real >= 1 and fake <= -1.

    Computed in float32 whatever the logits' dtype (bf16 under autocast).
    """
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean(fake)``: the generator pushes the discriminator's logits on its output up."""
    return -logits_fake.float().mean()


def feature_matching_loss(
    feats_real: Sequence[torch.Tensor], feats_fake: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean over layers of the L1 distance between discriminator activations; real is detached."""
    if len(feats_real) != len(feats_fake) or not feats_real:
        raise ValueError(
            f"feature lists must be non-empty and of equal length, got {len(feats_real)} real "
            f"and {len(feats_fake)} fake"
        )
    losses = [F.l1_loss(fake, real.detach()) for real, fake in zip(feats_real, feats_fake)]
    return torch.stack([loss.float() for loss in losses]).mean()


def random_slices(
    *volumes: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """The same ``n`` distinct random axial slices of each ``(B, C, D, H, W)`` volume.

    One draw of slice indices (``n`` per batch element, drawn from ``generator``) is applied to
    every volume, so the input and its reconstruction give matching ``(B * n, C, H, W)`` slices,
    ordered batch element first.
    """
    if not volumes:
        raise ValueError("random_slices needs at least one volume")
    shape = volumes[0].shape
    if len(shape) != 5 or any(v.shape != shape for v in volumes):
        raise ValueError(
            f"volumes must share one (B, C, D, H, W) shape, got {[tuple(v.shape) for v in volumes]}"
        )
    batch, channels, depth, height, width = shape
    if not 1 <= n <= depth:
        raise ValueError(f"n must be in [1, {depth}] (the volume depth), got {n}")
    device = generator.device if generator is not None else volumes[0].device
    scores = torch.rand(batch, depth, generator=generator, device=device)
    index = scores.argsort(dim=1)[:, :n].to(volumes[0].device)  # (B, n), distinct per row
    rows = torch.arange(batch, device=index.device)[:, None]
    return tuple(
        v.transpose(1, 2)[rows, index].reshape(batch * n, channels, height, width) for v in volumes
    )
