"""The Accelerate training loop: one script for 1 GPU, 4 GPUs, several nodes or CPU processes.

`train` is the set-up (`setup.py`), then per micro-batch the generator and critic steps
(`steps.py`), then per optimizer step the on-sync work here: schedules, log, validation,
checkpoint. Checkpoints hold everything needed to continue on the same world size (bit for bit
on CPU; on GPUs up to the non-determinism of CUDA kernels, see `training.deterministic`) and to
continue on another one (the data position is kept as a global sample count).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import VQGAN3D
from ..utils.atomic import atomic_path
from .checkpoints import save_checkpoint
from .config import TrainConfig, config_to_yaml
from .hub_sync import HubSync, resolve_resume
from .metrics_log import MetricsLogger
from .nonfinite import NonFiniteLossError
from .setup import TrainingParts, build_training, resume_training
from .steps import model_input, train_micro_batch
from .export import export_model
from .validation import mid_slices_path, validate

__all__ = ["NonFiniteLossError", "TrainResult", "train"]


@dataclass
class TrainResult:
    """What `train` hands back: the trained generator (unwrapped, on this process) and where it went."""

    model: VQGAN3D
    step: int
    final_dir: Path | None  # None when the run stopped early (`training.stop_at_step`)
    validation: dict[str, float] | None = None  # this run's last validation figures (`val_psnr`, ...), if any
    mid_slices: Path | None = None  # that validation's picture, input | reconstruction | error (main process)


class MetricWindow:
    """Loss terms summed on the device between log steps (no host sync per step); finite micro-batches only."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.finite_batches: torch.Tensor | float = 0.0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        finite = torch.isfinite(terms["loss"]).float()
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + torch.where(finite > 0, value.float(), 0.0)
        self.finite_batches = self.finite_batches + finite
        self.samples += samples

    def row(self, accelerator) -> dict[str, float]:
        """Means over the window and all processes (one all-reduce), then reset."""
        names = sorted(self.sums)  # the same terms on every process
        totals = accelerator.reduce(torch.stack([self.sums[n] for n in names] + [self.finite_batches]), "sum")
        values = totals.tolist()
        count = max(values[-1], 1.0)
        row = {name: value / count for name, value in zip(names, values)}
        row["patches_per_s"] = self.samples / (time.perf_counter() - self.started)
        self.__init__()
        return row


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run (or continue) training to `training.max_steps` (or `stop_at_step`)."""
    parts = build_training(config)
    accelerator, state = parts.accelerator, parts.state
    out = parts.output_dir
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as temporary:
            temporary.write_text(config_to_yaml(config))
    accelerator.init_trackers("ctpa-vq")
    hub = HubSync(config.hub, out / ".hub-staging", enabled=accelerator.is_main_process)
    resume_training(parts, resolve_resume(resume, out, config.hub, accelerator))

    metrics = MetricsLogger(accelerator, out / "metrics.csv", start_step=state.step)
    samples_per_batch = config.training.batch_size * accelerator.num_processes
    micro_batches = state.samples_seen // samples_per_batch
    batches_per_epoch = len(parts.loader)
    last_step = min(config.training.max_steps, config.training.stop_at_step or config.training.max_steps)
    progress = tqdm(
        total=last_step, initial=state.step, desc="training", disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    parts.model.train()
    window = MetricWindow()
    validation, mid_slices = None, None
    while state.step < last_step:
        epoch, skip = divmod(micro_batches, batches_per_epoch)
        parts.loader.set_epoch(epoch)  # the sampler's permutation
        parts.dataset.set_epoch(epoch)  # the patch positions
        epoch_loader = accelerator.skip_first_batches(parts.loader, skip) if skip else parts.loader
        for batch in epoch_loader:
            terms = train_micro_batch(parts, model_input(parts, batch), micro_batches)
            micro_batches += 1
            state.samples_seen += samples_per_batch
            window.add(terms, samples_per_batch)
            if not accelerator.sync_gradients:
                continue
            step_schedules(parts)
            parts.guard.end_step()
            state.step += 1
            progress.update(1)
            validated = on_sync(parts, window, metrics, epoch, last_step, progress, hub)
            if validated is not None:
                validation, mid_slices = validated, mid_slices_path(out / "samples", state.step)
            if state.step >= last_step:
                break
    progress.close()
    final = out / "final" if state.step >= config.training.max_steps else None
    if final is not None and accelerator.is_main_process:
        export_model(accelerator.unwrap_model(parts.model), final, out)
        hub.push_export(final, state.step, "end")
    hub.close()  # waits for the queued uploads; a failed one was logged, never raised
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        mid_slices = None  # process 0 draws it
    return TrainResult(accelerator.unwrap_model(parts.model), state.step, final, validation, mid_slices)


def step_schedules(parts: TrainingParts) -> None:
    """Advance both learning-rate schedules by one optimizer step (the critics' even before they start)."""
    parts.sched_g.step()
    if parts.sched_d is not None:
        with warnings.catch_warnings():  # before gan.start_step the critics' optimizer has not stepped
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
            parts.sched_d.step()


def on_sync(
    parts: TrainingParts, window: MetricWindow, metrics: MetricsLogger, epoch: int, last_step: int, progress=None,
    hub: HubSync | None = None,
) -> dict[str, float] | None:
    """After an optimizer step: log (and check for non-finite runs), validate, checkpoint, as due.
    Returns the validation figures when this step validated."""
    training, step = parts.config.training, parts.state.step
    if step % training.log_every == 0 or step == last_step:
        row = window.row(parts.accelerator)
        row.update(epoch=epoch, samples_seen=parts.state.samples_seen, lr=parts.sched_g.get_last_lr()[0])
        row["skipped_steps"] = parts.guard.check()
        if parts.sched_d is not None:
            row["d_lr"] = parts.sched_d.get_last_lr()[0]
        metrics.log(step, row)
        if progress is not None:
            progress.set_postfix(loss=f"{row['loss']:.4f}", l1=f"{row['l1']:.4f}")
    validation = None
    if step % training.validate_every == 0 or step == last_step:
        validation = validate_and_export(parts, metrics, hub)
    if step % training.checkpoint_every == 0 or step == last_step:
        parts.guard.check()  # never checkpoint past a run of non-finite steps
        checkpoint = save_checkpoint(
            parts.accelerator, parts.output_dir / "checkpoints", step, training.keep_checkpoints, parts.resumed_from
        )
        if hub is not None:
            hub.push_checkpoint(checkpoint, step)
    return validation


def validate_and_export(
    parts: TrainingParts, metrics: MetricsLogger, hub: HubSync | None = None
) -> dict[str, float] | None:
    """Every process scores its share of the validation volumes; a new best PSNR exports `best/`.
    Returns the figures logged (the same on every process), None without validation volumes."""
    accelerator, state = parts.accelerator, parts.state
    if not len(parts.val_volumes):
        return None
    unwrapped = accelerator.unwrap_model(parts.model)
    try:  # the pipeline (validation and export) puts the model in eval mode; training resumes in train mode
        results = validate(
            unwrapped, parts.val_volumes, parts.config, parts.output_dir / "samples", state.step, accelerator
        )
        metrics.log(state.step, results)
        # The gathered results are the same on every process, and so is this decision.
        if results["val_psnr"] > state.best_val_psnr:
            state.best_val_psnr = results["val_psnr"]
            if accelerator.is_main_process:
                export_model(unwrapped, parts.output_dir / "best", parts.output_dir)
                if hub is not None:
                    hub.push_export(parts.output_dir / "best", state.step, "best")
    finally:
        unwrapped.train()
    accelerator.wait_for_everyone()
    return results
