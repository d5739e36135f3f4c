"""Vector quantizers for 3D latents: an EMA codebook and finite scalar quantization (FSQ).

Both take continuous latents ``z`` of shape ``(B, C, d, h, w)`` and return a
:class:`QuantizerOutput`; both map indices ``(B, d, h, w)`` back to codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
        z_q: quantised latents `(B, C, d, h, w)`, with straight-through gradients to `z`.
        indices: code indices `(B, d, h, w)`, int64.
        commitment_loss: scalar, `beta * ||z - sg(z_q)||^2` (zero for FSQ).
        perplexity: scalar, `exp(entropy)` of the code histogram of this step (all processes).
        codebook_usage: scalar in [0, 1], fraction of codes used in this step (all processes).
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    codebook_usage: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """`z_q` forward, identity gradient to `z`; exactly `z_q` when no gradient is needed."""
    return z + (z_q - z).detach() if z.requires_grad else z_q


def _histogram_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and usage fraction of a code histogram `(K,)`."""
    probs = counts / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
    return perplexity, (counts > 0).float().mean()


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour codebook updated by exponential moving averages (VQ-VAE-2 / TATS).

    The codebook is a set of buffers, not parameters: the optimizer never sees it. In training
    mode each forward pass updates it from the batch; under ``torch.distributed`` the counts and
    sums are all-reduced first and dead-code restarts are broadcast from rank 0, so every replica
    holds the same codebook after every step. The ``initialized`` flag is a saved buffer: a
    loaded model never re-initialises its codebook from data.

    Args:
        num_codes: codebook size K.
        code_dim: code dimension C.
        decay: EMA decay of counts and sums.
        commitment_weight: beta of the commitment loss.
        dead_code_threshold: a code whose EMA count falls below this is restarted on one of
            the batch's latent vectors farthest from their nearest code.
        eps: Laplace smoothing of the counts.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        self.register_buffer("embedding", torch.randn(num_codes, code_dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """`(B, d, h, w)` int -> `(B, C, d, h, w)` codes."""
        return F.embedding(indices, self.embedding).permute(0, 4, 1, 2, 3).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise `z` `(B, C, d, h, w)`; in training mode also update the codebook."""
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.permute(0, 2, 3, 4, 1).reshape(-1, self.code_dim)
            if self.training and not bool(self.initialized):
                self._initialize(flat)
            codebook = self.embedding.float()
            distances = (
                flat.pow(2).sum(1, keepdim=True)
                - 2.0 * flat @ codebook.t()
                + codebook.pow(2).sum(1)[None, :]
            )
            min_distances, flat_indices = distances.min(dim=1)
            counts = torch.bincount(flat_indices, minlength=self.num_codes).float()
            if self.training:
                counts = self._update_codebook(flat, flat_indices, counts, min_distances)
            b, _, d, h, w = z.shape
            indices = flat_indices.view(b, d, h, w)
            z_q = self.indices_to_codes(indices).float()
            commitment_loss = self.commitment_weight * F.mse_loss(z, z_q)
            z_q = _straight_through(z, z_q)
        perplexity, usage = _histogram_stats(counts)
        return QuantizerOutput(z_q.to(in_dtype), indices, commitment_loss, perplexity, usage)

    @torch.no_grad()
    def _initialize(self, flat: torch.Tensor) -> None:
        """Seed the codebook with random latent vectors of the first batch (rank 0's, broadcast)."""
        picks = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        self.embedding.copy_(flat[picks])
        self.embed_sum.copy_(self.embedding)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)
        self._broadcast_from_rank0()

    @torch.no_grad()
    def _update_codebook(
        self, flat: torch.Tensor, flat_indices: torch.Tensor, counts: torch.Tensor, min_distances: torch.Tensor
    ) -> torch.Tensor:
        """EMA update from this step's assignments; returns the (global) code histogram."""
        sums = torch.zeros_like(self.embed_sum, dtype=torch.float32).index_add_(0, flat_indices, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self._restart_dead_codes(flat, min_distances)
        return counts

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, min_distances: torch.Tensor) -> None:
        """Move codes whose EMA count fell below the threshold onto the worst-represented latents.

        Deterministic (no RNG): the latents farthest from their nearest code are taken, so a
        resumed run restarts exactly the same codes with the same vectors.
        """
        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        worst = min_distances.topk(min(num_dead, flat.shape[0])).indices
        picks = worst.repeat(num_dead // worst.numel() + 1)[:num_dead]
        self.embedding[dead] = flat[picks]
        self.embed_sum[dead] = flat[picks]
        self.cluster_size[dead] = 1.0
        self._broadcast_from_rank0()

    def _broadcast_from_rank0(self) -> None:
        if _distributed():
            for buffer in (self.embedding, self.embed_sum, self.cluster_size):
                dist.broadcast(buffer, src=0)


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantization (Mentzer et al., 2023): a fixed grid that cannot collapse.

    Each of the C = ``len(levels)`` channels is bounded with tanh and rounded to one of
    ``levels[c]`` values; the implicit codebook has ``prod(levels)`` entries, all reachable.
    There is nothing to learn, nothing to synchronise and no commitment loss.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        self.levels = list(levels)
        self.code_dim = len(self.levels)
        self.num_codes = int(torch.tensor(self.levels).prod())
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1]), dim=0)
        # Constants derived from `levels` (not state): kept out of the state dict.
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        half = self._levels // 2
        return ((codes * half + half).round().long() * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """`(B, d, h, w)` int -> `(B, C, d, h, w)` codes in [-1, 1]."""
        half = self._levels // 2
        digits = (indices[..., None] // self._basis) % self._levels.long()
        return ((digits - half) / half).permute(0, 4, 1, 2, 3).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        in_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_channels_last = z.float().permute(0, 2, 3, 4, 1)
            bounded = self._bound(z_channels_last)
            rounded = _straight_through(bounded, bounded.round())
            codes = rounded / (self._levels // 2)
            indices = self._codes_to_indices(codes.detach())
        counts = torch.bincount(indices.flatten(), minlength=self.num_codes).float()
        if self.training and _distributed():  # eval may run on one rank alone: no collectives there
            dist.all_reduce(counts)
        perplexity, usage = _histogram_stats(counts)
        z_q = codes.permute(0, 4, 1, 2, 3).to(in_dtype)
        return QuantizerOutput(z_q, indices, z.new_zeros((), dtype=torch.float32), perplexity, usage)
