"""Training losses: the dense-voxel weighted L1, hinge GAN losses, feature matching, random axial slices.

The reconstruction term is L1 in the [-1, 1] window, optionally with the voxels at or above a
threshold (contrast-enhanced vessels and bone, under 1% of a chest CT's body) weighted more: an
unweighted L1 over whole patches barely sees them. An optional SSIM term (3D, Gaussian window as
in the reported metric) pulls local contrast and structure, which L1 alone leaves blurred. The
adversarial recipe is TATS / medicaldiffusion's: a 2D discriminator on random axial slices and a 3D one
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


def _gaussian_window(kernel_size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """The normalised 1D Gaussian `(kernel_size,)` in `like`'s dtype and device."""
    offsets = torch.arange(kernel_size, dtype=like.dtype, device=like.device) - (kernel_size - 1) / 2
    window = torch.exp(-offsets.square() / (2 * sigma**2))
    return window / window.sum()


def ssim_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 2.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """``1 - SSIM`` of ``(B, C, D, H, W)`` volumes: 3D Gaussian window, averaged over valid positions.

    The window is separable, so it runs as three 1D convolutions over the five local moments
    (torchmetrics' SSIM, the metric this matches, convolves with the full 11^3 kernel: about
    70x slower on a 16x32x32 patch on CPU, too slow for a training step). ``data_range`` is the
    intensity span (2 for [-1, 1]). Every spatial axis must be at least ``kernel_size`` long.
    Computed in float32 even under autocast, whose bf16 convolutions would leave the local
    variances ``E[x^2] - E[x]^2`` of a close reconstruction with few correct digits.
    """
    if reconstruction.ndim != 5 or reconstruction.shape != target.shape:
        raise ValueError(
            f"ssim_loss needs two (B, C, D, H, W) volumes of one shape, got {tuple(reconstruction.shape)} "
            f"and {tuple(target.shape)}"
        )
    if min(target.shape[2:]) < kernel_size:
        raise ValueError(f"ssim_loss needs every spatial axis >= {kernel_size} voxels, got {tuple(target.shape[2:])}")
    with torch.autocast(device_type=target.device.type, enabled=False):
        x, y = reconstruction.float(), target.float()
        channels = x.shape[1]
        moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, D, H, W)
        window = _gaussian_window(kernel_size, sigma, moments)
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel_size
            moments = F.conv3d(moments, window.view(shape).expand(5 * channels, *shape[1:]), groups=5 * channels)
        mu_x, mu_y, xx, yy, xy = moments.split(channels, dim=1)
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        var_x, var_y, cov = xx - mu_x.square(), yy - mu_y.square(), xy - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
        return 1 - ssim.mean()


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
    ordered batch element first. The draw runs on the volumes' device: ``generator`` must be
    there too (indices drawn on the host would be copied to the GPU, a host synchronisation).
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
    device = volumes[0].device
    drawn_on = generator.device if generator is not None else device  # a CUDA generator may name no index
    if drawn_on.type != device.type or drawn_on.index not in (None, device.index):
        raise ValueError(f"random_slices: generator on {drawn_on}, volumes on {device}: draw where the volumes are")
    scores = torch.rand(batch, depth, generator=generator, device=device)
    index = scores.argsort(dim=1)[:, :n]  # (B, n), distinct per row
    rows = torch.arange(batch, device=index.device)[:, None]
    return tuple(
        v.transpose(1, 2)[rows, index].reshape(batch * n, channels, height, width) for v in volumes
    )
