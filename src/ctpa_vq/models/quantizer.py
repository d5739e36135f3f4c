"""Vector quantizers for 3D latents: an EMA codebook and finite scalar quantization (FSQ).

Both take continuous latents ``z`` of shape ``(B, C, d, h, w)`` and return a
:class:`QuantizerOutput`; both map indices ``(B, d, h, w)`` back to codes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

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


def code_counts(indices: torch.Tensor, num_codes: int, include: torch.Tensor | None = None) -> torch.Tensor:
    """How often each code occurs in `indices` (any shape, int64): float32 `(num_codes,)`.

    `include` (bool, the shape of `indices`) leaves out the positions where it is False. What
    ``torch.bincount(indices.flatten(), minlength=num_codes).float()`` gives, but its output
    size does not depend on the values: CUDA's ``bincount`` reads the largest index back to the
    host, a synchronisation every training step. Counted in int64, so exact at any batch size.
    """
    flat = indices.flatten()
    ones = torch.ones_like(flat) if include is None else include.flatten().long()
    counts = torch.zeros(num_codes, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, ones).float()


def _histogram_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perplexity and usage fraction of a code histogram `(K,)`."""
    probs = counts / counts.sum().clamp(min=1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
    return perplexity, (counts > 0).float().mean()


@contextmanager
def _ieee_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls in IEEE fp32 inside: no TF32 on CUDA (`training.tf32`), no TF32 or bf16 in oneDNN
    on CPU (`torch.set_float32_matmul_precision`). Process-wide, as these settings are; restored on exit.

    torch >= 2.9 has a setting per backend (`fp32_precision`, which its matmul kernels read; only
    these are touched, so a caller's legacy `allow_tf32` reads the same afterwards); before, the one
    `float32_matmul_precision`.
    """
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        settings = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        saved, ieee = [setting.fp32_precision for setting in settings], ["ieee"] * len(settings)

        def apply(precisions: list[str]) -> None:
            for setting, precision in zip(settings, precisions):
                setting.fp32_precision = precision

    else:
        saved, ieee = [torch.get_float32_matmul_precision()], ["highest"]

        def apply(precisions: list[str]) -> None:
            torch.set_float32_matmul_precision(precisions[0])

    apply(ieee)
    try:
        yield
    finally:
        apply(saved)


@torch.compiler.disable  # eager under torch.compile: the precision switch is host state Dynamo cannot trace
def nearest_codes(
    flat: torch.Tensor, codebook: torch.Tensor, budget_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest code of each latent.

    `flat` `(N, C)` and `codebook` `(K, C)` -> `(N,)` distances and `(N,)` int64 indices. The
    latents go in chunks whose `(chunk, K)` fp32 score matrix fits in `budget_bytes`
    (`DISTANCE_BUDGET_BYTES`): at 128x256x256 with 16384 codes the full matrix would be 8.6 GB.
    The matmuls run in IEEE fp32 even where TF32 is on: the indices are a downstream model's data,
    and TF32's 10-bit mantissa moves 0.1-2% of them to another code.
    """
    rows = max(1, (budget_bytes or DISTANCE_BUDGET_BYTES) // (4 * codebook.shape[0]))
    code_norms = codebook.pow(2).sum(1)
    distances, indices = [], []
    with _ieee_fp32_matmuls():
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

    A latent vector with a NaN or infinite component (one overflowing activation) is still given an
    index, but enters none of the above: not the moments, counts and sums, nor the restart offers.
    A step without one finite latent on any process changes no code and restarts none.

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
            finite = flat.isfinite().all(1)  # (N,): the latents the codebook may learn from
            clean = torch.where(finite[:, None], flat, 0.0)
            codebook = self._codebook_of_this_step(clean, finite) if learning else self.embedding.float()
            min_distances, flat_indices = nearest_codes(flat, codebook)
            indices = flat_indices.view(b, d, h, w)
            z_q = F.embedding(indices, codebook).permute(0, 4, 1, 2, 3).contiguous()  # before the update
            commitment_loss = self.commitment_weight * F.mse_loss(z, z_q)
            counts = code_counts(flat_indices, self.num_codes, include=finite)
            restarted = torch.zeros((), dtype=torch.long, device=z.device)
            if learning:
                scores = torch.where(finite, min_distances, float("-inf"))  # never a restart offer
                counts, restarted = self._update_codebook(clean, flat_indices, counts, scores)
            z_q = _straight_through(z, z_q)
        perplexity, usage = _histogram_stats(counts)
        return QuantizerOutput(z_q.to(in_dtype), indices, commitment_loss, perplexity, usage, restarted)

    @torch.no_grad()
    def _codebook_of_this_step(self, clean: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """The codebook, or before initialisation the noise in it rescaled to the moments of the
        batch's finite latents (`clean` `(N, C)`, zero where `finite` `(N,)` is False)."""
        moments = torch.cat([clean.sum(0), clean.pow(2).sum(0), finite.sum(0, keepdim=True).float()])
        if _distributed():
            dist.all_reduce(moments)
        total, total_sq, n = moments.split([self.code_dim, self.code_dim, 1])
        n = n.clamp(min=1)  # no finite latent anywhere: zero moments, not 0 / 0
        mean = total / n
        std = (total_sq / n - mean.square()).clamp(min=0).sqrt()
        return torch.where(self.initialized, self.embedding, mean + std * self.embedding)

    @torch.no_grad()
    def _update_codebook(
        self, clean: torch.Tensor, flat_indices: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EMA update and restarts from this step's assignments; returns the global histogram and the restart count.

        `clean` `(N, C)` are the latents with the non-finite ones zeroed, `counts` `(K,)` their
        histogram without the non-finite ones, `scores` `(N,)` the distances to the nearest code,
        -inf for the non-finite latents.
        """
        sums = torch.zeros_like(self.embed_sum, dtype=torch.float32).index_add_(0, flat_indices, clean)
        if _distributed():
            stats = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        # total is 0 only before initialisation, on a step without one finite latent: nothing to learn.
        self.embedding.copy_(torch.where(total > 0, self.embed_sum / smoothed[:, None], self.embedding))
        restarted = self._restart_dead_codes(clean, scores)
        self.initialized.logical_or_(total > 0)
        return counts, restarted

    @torch.no_grad()
    def _restart_dead_codes(self, clean: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Move dead codes onto the worst-represented latents (see the class docstring); returns how many."""
        mean_count = self.cluster_size.mean()
        candidates, num_candidates = self._worst_represented(clean, scores)
        # No finite latent on any process: nothing to restart onto this step.
        dead = (self.cluster_size <= self.dead_code_threshold * mean_count) & (num_candidates > 0)
        # The i-th dead code takes the i-th worst latent (cycling when there are fewer latents).
        slot = (dead.long().cumsum(0) - 1).clamp(min=0) % num_candidates.clamp(min=1)
        replacement = candidates[slot]
        self.embedding.copy_(torch.where(dead[:, None], replacement, self.embedding))
        self.embed_sum.copy_(torch.where(dead[:, None], replacement * mean_count, self.embed_sum))
        self.cluster_size.copy_(torch.where(dead, mean_count, self.cluster_size))
        return dead.sum()

    def _worst_represented(self, clean: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K latents of `clean` `(N, C)` with the highest `scores` `(N,)` (distance to their nearest
        code; -inf: never offered), over all processes.

        Returns `(K, C)` latents, worst first, and how many of them are real (fewer when the
        global batch has fewer than K finite latents; the rest is padding).

        Each process offers its own K worst (padded with -inf scores when it has fewer latents);
        the K worst of all offers are the K worst of the global batch.
        """
        k = min(self.num_codes, clean.shape[0])
        worst = scores.topk(k)
        offers = torch.cat([worst.values[:, None], clean[worst.indices]], dim=1)
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
        counts = code_counts(indices, self.num_codes)
        if self.training and _distributed():  # eval may run on one rank alone: no collectives there
            dist.all_reduce(counts)
        perplexity, usage = _histogram_stats(counts)
        z_q = codes.permute(0, 4, 1, 2, 3).to(in_dtype)
        no_loss, no_restarts = z.new_zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.long, device=z.device)
        return QuantizerOutput(z_q, indices, no_loss, perplexity, usage, no_restarts)
