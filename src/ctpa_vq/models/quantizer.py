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


DISTANCE_BUDGET_BYTES = 1 << 28  # fp32 distance matrix per chunk of latents: 256 MiB


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
        z_q: quantised latents `(B, C, d, h, w)`, with straight-through gradients to `z`.
        indices: code indices `(B, d, h, w)`, int64.
        commitment_loss: scalar, `beta * ||z - sg(z_q)||^2` (zero for FSQ).
        perplexity: scalar, `exp(entropy)` of the code histogram of this step (all processes).
        codebook_usage: scalar in [0, 1], fraction of codes used in this step (all processes).
        restarted_codes: scalar int64, dead codes restarted by this step (zero outside training, and for FSQ).
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    codebook_usage: torch.Tensor
    restarted_codes: torch.Tensor


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


def nearest_codes(
    flat: torch.Tensor, codebook: torch.Tensor, budget_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest code of each latent.

    `flat` `(N, C)` and `codebook` `(K, C)` -> `(N,)` distances and `(N,)` int64 indices. The
    latents go in chunks whose `(chunk, K)` fp32 score matrix fits in `budget_bytes`
    (`DISTANCE_BUDGET_BYTES`): at 128x256x256 with 16384 codes the full matrix would be 8.6 GB.
    """
    rows = max(1, (budget_bytes or DISTANCE_BUDGET_BYTES) // (4 * codebook.shape[0]))
    code_norms = codebook.pow(2).sum(1)
    distances, indices = [], []
    for chunk in flat.split(rows):
        # ||z - c||^2 = ||z||^2 + (||c||^2 - 2 z.c): the argmin needs the bracket only.
        best = torch.addmm(code_norms, chunk, codebook.t(), alpha=-2.0).min(dim=1)
        distances.append(best.values + chunk.pow(2).sum(1))
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


class EMAVectorQuantizer(nn.Module):
    """Nearest-neighbour codebook updated by exponential moving averages (VQ-VAE-2 / TATS).

    The codebook is a set of buffers, not parameters: the optimizer never sees it. A training
    forward pass quantises with the codebook as it is, then updates it from the batch (so `z_q`
    is always the code its index names in the codebook the index was chosen from):

    1. EMA of the per-code counts and sums, all-reduced over processes first.
    2. Dead-code restart. A code is dead when its EMA count falls to
       ``dead_code_threshold * mean count`` or below, i.e. a share of what a uniformly used code
       gets. Counts scale with the global batch, the mean count with them, so the threshold
       means the same on 1 GPU and on 4. A dead code moves onto one of the latents farthest
       from their nearest code, taken over all processes (gathered; the same choice on every
       process and for any split of the global batch; no RNG, so resumed runs are exact), and
       gets the mean count: unused, it survives ``log(threshold) / log(decay)`` steps.
    3. Initialisation: before its first training step the codebook is a fixed standard-normal
       draw; that step uses it rescaled to the batch's per-channel mean and std (all processes;
       the moments cost one all-reduce of 2C + 1 numbers per step instead of a host check of
       the flag). Codes the first batch leaves unused are dead and restart at once.

    A ``frozen`` quantizer (fine-tuning with ``model.freeze: [quantizer]``) quantises in training
    mode as in eval mode: no EMA update, no restart, the codebook left as it is.

    Nothing here waits for the device: the branches are tensor masks (`torch.where`), so a
    training step never synchronises the host. The ``initialized`` flag is a saved buffer: a
    loaded model never re-initialises its codebook.

    Args:
        num_codes: codebook size K.
        code_dim: code dimension C.
        decay: EMA decay of counts and sums.
        commitment_weight: beta of the commitment loss.
        dead_code_threshold: in [0, 1), the share of the mean EMA count at or below which a code
            is dead (0: only codes never used since they were set).
        eps: Laplace smoothing of the counts.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 0.05,
        eps: float = 1e-5,
    ):
        super().__init__()
        if not 0.0 <= dead_code_threshold < 1.0:
            raise ValueError(
                "dead_code_threshold is a share of the mean code count and must be in [0, 1), "
                f"got {dead_code_threshold}"
            )
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        # The same draw on every process whatever the global seed: initialisation only rescales it.
        # fp32 whatever the default dtype (diffusers builds a `torch_dtype=bf16` model under that default).
        noise = torch.randn(num_codes, code_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        self.register_buffer("embedding", noise)
        self.register_buffer("cluster_size", torch.zeros(num_codes, dtype=torch.float32))
        self.register_buffer("embed_sum", torch.zeros(num_codes, code_dim, dtype=torch.float32))
        self.register_buffer("initialized", torch.tensor(False))
        self.frozen = False  # a training choice, not state: never saved

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """`(B, d, h, w)` int -> `(B, C, d, h, w)` codes."""
        return F.embedding(indices, self.embedding).permute(0, 4, 1, 2, 3).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise `z` `(B, C, d, h, w)`; in training mode then update the codebook."""
        in_dtype = z.dtype
        b, _, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            flat = z.permute(0, 2, 3, 4, 1).reshape(-1, self.code_dim)
            learning = self.training and not self.frozen
            codebook = self._codebook_of_this_step(flat) if learning else self.embedding.float()
            min_distances, flat_indices = nearest_codes(flat, codebook)
            indices = flat_indices.view(b, d, h, w)
            z_q = F.embedding(indices, codebook).permute(0, 4, 1, 2, 3).contiguous()  # before the update
            commitment_loss = self.commitment_weight * F.mse_loss(z, z_q)
            counts = torch.bincount(flat_indices, minlength=self.num_codes).float()
            restarted = torch.zeros((), dtype=torch.long, device=z.device)
            if learning:
                counts, restarted = self._update_codebook(flat, flat_indices, counts, min_distances)
            z_q = _straight_through(z, z_q)
        perplexity, usage = _histogram_stats(counts)
        return QuantizerOutput(z_q.to(in_dtype), indices, commitment_loss, perplexity, usage, restarted)

    @torch.no_grad()
    def _codebook_of_this_step(self, flat: torch.Tensor) -> torch.Tensor:
        """The codebook, or before initialisation the noise in it rescaled to the batch's moments."""
        moments = torch.cat([flat.sum(0), flat.pow(2).sum(0), flat.new_full((1,), flat.shape[0])])
        if _distributed():
            dist.all_reduce(moments)
        total, total_sq, n = moments.split([self.code_dim, self.code_dim, 1])
        mean = total / n
        std = (total_sq / n - mean.square()).clamp(min=0).sqrt()
        return torch.where(self.initialized, self.embedding, mean + std * self.embedding)

    @torch.no_grad()
    def _update_codebook(
        self, flat: torch.Tensor, flat_indices: torch.Tensor, counts: torch.Tensor, min_distances: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EMA update and restarts from this step's assignments; returns the global histogram and the restart count."""
        sums = torch.zeros_like(self.embed_sum, dtype=torch.float32).index_add_(0, flat_indices, flat)
        if _distributed():
            stats = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        restarted = self._restart_dead_codes(flat, min_distances)
        self.initialized.fill_(True)
        return counts, restarted

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, min_distances: torch.Tensor) -> torch.Tensor:
        """Move dead codes onto the worst-represented latents (see the class docstring); returns how many."""
        mean_count = self.cluster_size.mean()
        dead = self.cluster_size <= self.dead_code_threshold * mean_count
        candidates, num_candidates = self._worst_represented(flat, min_distances)
        # The i-th dead code takes the i-th worst latent (cycling when there are fewer latents).
        slot = (dead.long().cumsum(0) - 1).clamp(min=0) % num_candidates
        replacement = candidates[slot]
        self.embedding.copy_(torch.where(dead[:, None], replacement, self.embedding))
        self.embed_sum.copy_(torch.where(dead[:, None], replacement * mean_count, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, mean_count, self.cluster_size))
        return dead.sum()

    def _worst_represented(self, flat: torch.Tensor, min_distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K latents farthest from their nearest code, over all processes.

        Returns `(K, C)` latents, worst first, and how many of them are real (fewer when the
        global batch has fewer than K latents; the rest is padding).

        Each process offers its own K worst (padded with -inf scores when it has fewer latents);
        the K worst of all offers are the K worst of the global batch.
        """
        k = min(self.num_codes, flat.shape[0])
        worst = min_distances.topk(k)
        offers = torch.cat([worst.values[:, None], flat[worst.indices]], dim=1)
        offers = F.pad(offers, (0, 0, 0, self.num_codes - k), value=float("-inf"))
        if _distributed():
            gathered = [torch.empty_like(offers) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, offers)
            pool = torch.cat(gathered)
            offers = pool[pool[:, 0].topk(self.num_codes).indices]
        num_real = (offers[:, 0] > float("-inf")).sum()
        return offers[:, 1:], num_real


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
        no_loss, no_restarts = z.new_zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.long, device=z.device)
        return QuantizerOutput(z_q, indices, no_loss, perplexity, usage, no_restarts)
