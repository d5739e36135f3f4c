"""The non-finite-loss policy: skip the step on every process, stop after N in a row.

Nothing here reads a tensor on the host during a step. A micro-batch whose loss is NaN or Inf
is *poisoned* (its loss multiplied by NaN), so every gradient it reaches is NaN; under DDP the
all-reduce spreads that to every process. The optimizer step then reads the global gradient
norm (which `clip_grad_norm_` computes anyway, identical on every process) and hands the fused
AdamW kernel a `found_inf` flag on the device: the kernel leaves parameters, moments and its
step count unchanged. The learning-rate schedule and the data still advance (the step counts).

The host looks at the counters only where the loop synchronises anyway (log steps and
checkpoints): after `max_consecutive` skipped steps in a row it raises, naming the steps and the
loss terms of the last non-finite micro-batch.
"""

from __future__ import annotations

import torch


class NonFiniteLossError(FloatingPointError):
    """Too many non-finite steps in a row; the message names the steps and the loss terms."""


class NonFiniteGuard:
    """Device-side counters of non-finite steps for one process.

    Args:
        device: where the counters live (the model's device).
        max_consecutive: skipped steps in a row after which `check` raises.
        step: the number of optimizer steps already taken (non-zero when resuming).
    """

    def __init__(self, device: torch.device, max_consecutive: int, step: int = 0) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        zero = torch.zeros((), dtype=torch.long, device=device)
        self.step = zero + step  # optimizer steps taken, counted on the device
        self.step_skipped = torch.zeros((), dtype=torch.bool, device=device)
        self.consecutive = zero.clone()
        self.skipped = zero.clone()
        self.first_of_run = zero.clone()  # first step of the current run of skipped steps
        self.bad_terms: dict[str, torch.Tensor] = {}  # loss terms of the last non-finite micro-batch

    def poison(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """`loss`, or `loss * NaN` if it is not finite (so every gradient it reaches is NaN)."""
        finite = torch.isfinite(loss.detach())
        for name, value in terms.items():
            previous = self.bad_terms.get(name, torch.full_like(finite, float("nan"), dtype=torch.float32))
            self.bad_terms[name] = torch.where(finite, previous, value.detach().float())
        return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)

    def gate(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
        """Make the coming (fused) `optimizer.step()` a no-op if `grad_norm` is not finite."""
        bad = ~torch.isfinite(grad_norm.detach())
        self.step_skipped |= bad
        getattr(optimizer, "optimizer", optimizer).found_inf = bad.float()  # unwrap AcceleratedOptimizer

    def end_step(self) -> None:
        """Count the optimizer step just taken (skipped or not)."""
        self.step += 1
        self.consecutive = (self.consecutive + 1) * self.step_skipped
        self.first_of_run = torch.where(self.step_skipped & (self.consecutive == 1), self.step, self.first_of_run)
        self.skipped += self.step_skipped
        self.step_skipped = torch.zeros_like(self.step_skipped)

    def check(self) -> int:
        """Host read (call at log steps): raise after too many skipped steps; else the total skipped."""
        consecutive, first, last, skipped = torch.stack(
            [self.consecutive, self.first_of_run, self.step, self.skipped]
        ).tolist()
        if consecutive >= self.max_consecutive:
            values = torch.stack(list(self.bad_terms.values())).tolist() if self.bad_terms else []
            described = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.bad_terms, values)) or "none (the gradients were)"
            raise NonFiniteLossError(
                f"steps {first} to {last}: {consecutive} non-finite steps in a row "
                f"(training.max_nonfinite_steps={self.max_consecutive}); last non-finite loss terms: {described}. "
                "Lower optimizer.lr or critic_optimizer.lr, or check the data"
            )
        return skipped
