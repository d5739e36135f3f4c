"""The optimizers of a recipe (`OptimizerConfig`) and the learning-rate factors (for `LambdaLR`)
of the generator and of the critics.

Both schedules count optimizer steps, not micro-batches or samples, so a schedule is the same on
any world size and resumes exactly from the step saved in a checkpoint.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .config import OptimizerConfig


def adamw(parameters: Iterable[torch.nn.Parameter], settings: OptimizerConfig, **implementation) -> torch.optim.AdamW:
    """AdamW with the recipe's settings; `implementation` picks the kernel (`fused=True` in training)."""
    return torch.optim.AdamW(
        parameters, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay, **implementation
    )


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def critic_lr_factor(step: int, start: int, warmup: int, total: int, floor: float) -> float:
    """0 before the GAN stage starts at `start`; from there the generator's shape, shifted.

    The critics' first step (at `start`) uses `1 / warmup` of their learning rate, not a value
    already decayed by the steps the generator trained alone.
    """
    if step < start:
        return 0.0
    return lr_factor(step - start, warmup, total - start, floor)
