"""The Accelerate training loop: one script for 1 GPU, 4 GPUs, several nodes or CPU processes.

Per optimizer step: the generator is trained on L1 + commitment (+ perceptual, adversarial
and feature matching once `gan.start_step` is reached), then the critics on the detached
reconstruction. Checkpoints hold everything needed to continue bit for bit on the same world
size, and to continue on another one (the data position is kept as a global sample count).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.patch_dataset import RandomPatchDataset, VolumeStore
from ..data.phantom import write_phantom_dir
from ..data.prepare import prepare_dataset
from ..intensity import hu_to_unit
from ..models import VQGAN3D
from .adversarial import Discriminators
from .checkpoints import resolve_checkpoint, save_checkpoint
from .config import TrainConfig, config_to_yaml
from .losses import build_perceptual_loss, random_slices
from .metrics_log import MetricsLogger
from .validation import export_model, validate

logger = get_logger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the message names the step and the loss terms."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (`register_for_checkpointing`)."""

    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # training patches consumed, all processes together
    best_val_psnr: float = float("-inf")
    world_size: int = 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _volume_stores(config: TrainConfig, accelerator: Accelerator) -> tuple[VolumeStore, VolumeStore]:
    """The prepared train/validation splits; with no `dataset.path`, synthetic phantoms made once."""
    data = config.dataset
    path = Path(data.path) if data.path else Path(config.training.output_dir) / "phantom_dataset"
    if data.path is None:
        with accelerator.main_process_first():
            if accelerator.is_main_process and not path.exists():
                raw = Path(config.training.output_dir) / "phantoms"
                write_phantom_dir(raw, data.phantoms, data.phantom_shape, seed=config.training.seed)
                prepare_dataset(raw, path, data.val_fraction, data.max_patients, seed=config.training.seed)
    elif not path.exists():
        raise FileNotFoundError(f"{path}: dataset.path does not exist (create it with `ctpa-vq prepare`)")
    train, val = VolumeStore.from_disk(path, "train"), VolumeStore.from_disk(path, "validation")
    if data.path is not None and data.max_patients is not None:
        # A contiguous `select` slices the Arrow table: no copy of the volumes.
        train = VolumeStore(train.dataset.select(range(min(data.max_patients, len(train)))))
    return train, val


@dataclass
class TrainResult:
    """What `train` hands back: the trained generator (unwrapped, on this process) and where it went."""

    model: VQGAN3D
    step: int
    final_dir: Path | None  # None when the run stopped early (`training.stop_at_step`)


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run (or continue) training to `training.max_steps` (or `stop_at_step`)."""
    out = Path(config.training.output_dir)
    accelerator = Accelerator(
        cpu=config.training.cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    set_seed(config.training.seed, device_specific=True)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(config))
    accelerator.init_trackers("ctpa-vq")

    train_volumes, val_volumes = _volume_stores(config, accelerator)
    model = VQGAN3D.from_preset(config.model.preset, **config.model.overrides)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    hu_window = model.config.hu_window  # int16 HU batches are windowed on the device, in the step
    dataset = RandomPatchDataset(
        train_volumes,
        patch_size=config.dataset.patch_size,
        patches_per_volume=config.dataset.patches_per_volume,
        seed=config.training.seed,
        min_foreground_fraction=config.dataset.min_foreground_fraction,
    )
    loader = DataLoader(
        dataset, batch_size=config.training.batch_size, num_workers=config.dataset.num_workers, drop_last=True,
        pin_memory=accelerator.device.type == "cuda",
    )

    gan = config.gan
    discriminators = Discriminators(gan.image_gan_weight, gan.video_gan_weight, gan.channels, gan.layers)
    perceptual = build_perceptual_loss(gan.perceptual_weights) if gan.perceptual_weight > 0 else None
    opt_g = torch.optim.AdamW(
        model.parameters(), lr=config.model.lr, betas=config.model.betas, weight_decay=config.model.weight_decay
    )
    schedule = lambda step: _lr_factor(  # noqa: E731
        step, config.model.warmup_steps, config.training.max_steps, config.model.min_lr_ratio
    )
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, schedule)
    model, opt_g, loader = accelerator.prepare(model, opt_g, loader)
    opt_d = sched_d = None
    if gan.uses_discriminator:
        opt_d = torch.optim.AdamW(discriminators.parameters(), lr=gan.lr, betas=config.model.betas)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, schedule)
        discriminators, opt_d = accelerator.prepare(discriminators, opt_d)
    if perceptual is not None:
        perceptual.to(accelerator.device)

    # The schedulers step once per optimizer step whatever the world size, so they are not
    # handed to `prepare` (which would step them once per process).
    state = TrainState(world_size=accelerator.num_processes)
    accelerator.register_for_checkpointing(state, sched_g, *([sched_d] if sched_d else []))
    checkpoint_root = out / "checkpoints"
    start = resolve_checkpoint(checkpoint_root, resume)
    if resume is not None and start is None:
        logger.info(f"no checkpoint under {checkpoint_root} yet: starting from scratch", main_process_only=True)
    if start is not None:
        accelerator.load_state(str(start))
        if state.world_size != accelerator.num_processes:
            logger.warning(
                f"resuming a {state.world_size}-process checkpoint on {accelerator.num_processes} processes: "
                "model, codebook, optimizers and schedule carry over; per-process RNG streams restart",
                main_process_only=True,
            )
            state.world_size = accelerator.num_processes
        logger.info(f"resumed from {start} at step {state.step}", main_process_only=True)

    metrics = MetricsLogger(accelerator, out / "metrics.csv")
    samples_per_batch = config.training.batch_size * accelerator.num_processes
    micro_batches = state.samples_seen // samples_per_batch
    batches_per_epoch = len(loader)
    unwrapped_d = accelerator.unwrap_model(discriminators) if opt_d is not None else None
    last_step = min(config.training.max_steps, config.training.stop_at_step or config.training.max_steps)
    progress = tqdm(
        total=last_step, initial=state.step, desc="training", disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    model.train()
    running: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
    window_start, window_samples, window_batches = time.perf_counter(), 0, 0
    while state.step < last_step:
        epoch, skip = divmod(micro_batches, batches_per_epoch)
        loader.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            x = hu_to_unit(batch["hu"].to(accelerator.device, non_blocking=True), hu_window)
            gan_on = state.step >= gan.start_step
            with accelerator.accumulate(model, *([discriminators] if opt_d else [])), accelerator.autocast():
                out_g = model(x)
                reconstruction = out_g.sample
                l1 = (reconstruction.float() - x).abs().mean()
                loss = config.model.l1_weight * l1 + out_g.commitment_loss
                terms = {"l1": l1, "commitment": out_g.commitment_loss}
                if gan_on and (perceptual is not None or opt_d is not None):
                    # Seeded from (seed, step, rank), so a resumed run draws the same slices.
                    slice_rng = torch.Generator().manual_seed(
                        hash((config.training.seed, micro_batches, accelerator.process_index)) % 2**63
                    )
                    real_slices, fake_slices = random_slices(
                        x, reconstruction, n=gan.slices_per_volume, generator=slice_rng
                    )
                    if perceptual is not None:
                        terms["perceptual"] = perceptual(fake_slices.float(), real_slices)
                        loss = loss + gan.perceptual_weight * terms["perceptual"]
                    if opt_d is not None:
                        unwrapped_d.requires_grad_(False)
                        adversarial, matching = unwrapped_d.generator_terms(x, reconstruction, real_slices, fake_slices)
                        unwrapped_d.requires_grad_(True)
                        terms.update(g_adversarial=adversarial, feature_matching=matching)
                        loss = loss + adversarial + gan.feature_matching_weight * matching
                _check_finite(accelerator, loss, state.step, terms)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.model.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.model.grad_clip)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                if gan_on and opt_d is not None:
                    d_loss = discriminators(x, reconstruction.detach(), real_slices, fake_slices.detach())
                    _check_finite(accelerator, d_loss, state.step, {"d_loss": d_loss})
                    accelerator.backward(d_loss)
                    if accelerator.sync_gradients and config.model.grad_clip > 0:
                        accelerator.clip_grad_norm_(discriminators.parameters(), config.model.grad_clip)
                    opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    terms["d_loss"] = d_loss
            micro_batches += 1
            state.samples_seen += samples_per_batch
            window_samples += samples_per_batch
            window_batches += 1
            for name, value in {**terms, "loss": loss, "perplexity": out_g.perplexity,
                                "codebook_usage": out_g.codebook_usage}.items():  # fmt: skip
                running[name] = running.get(name, 0) + value.detach().float()
            if not accelerator.sync_gradients:
                continue

            sched_g.step()
            if sched_d is not None:
                sched_d.step()
            state.step += 1
            progress.update(1)
            if state.step % config.training.log_every == 0 or state.step == last_step:
                names = sorted(running)  # the same terms on every process: one all-reduce for the row
                means = accelerator.reduce(torch.stack([running[n] for n in names]) / window_batches, "mean")
                row = dict(zip(names, means.tolist()))
                elapsed = time.perf_counter() - window_start
                row.update(epoch=epoch, lr=sched_g.get_last_lr()[0], patches_per_s=window_samples / elapsed)
                metrics.log(state.step, row)
                progress.set_postfix(loss=f"{row['loss']:.4f}", l1=f"{row['l1']:.4f}")
                running.clear()
                window_start, window_samples, window_batches = time.perf_counter(), 0, 0
            if state.step % config.training.validate_every == 0 or state.step == last_step:
                _validate_and_export(accelerator, model, val_volumes, config, state, metrics)
            if state.step % config.training.checkpoint_every == 0 or state.step == last_step:
                save_checkpoint(accelerator, checkpoint_root, state.step, config.training.keep_checkpoints)
            if state.step >= last_step:
                break
    progress.close()
    final = out / "final" if state.step >= config.training.max_steps else None
    if final is not None and accelerator.is_main_process:
        export_model(accelerator.unwrap_model(model), final, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(accelerator.unwrap_model(model), state.step, final)


def _check_finite(accelerator: Accelerator, loss: torch.Tensor, step: int, terms: dict) -> None:
    """Stop every process together, naming the step, when any process sees a non-finite loss."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.reduce(finite, reduction="min").item() < 1:
        described = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1} ({described}); lower model.lr or check the data"
        )


def _validate_and_export(
    accelerator: Accelerator, model, val_volumes: VolumeStore, config: TrainConfig, state: TrainState, metrics
) -> None:
    """Rank 0 reconstructs the validation volumes; a new best PSNR exports `best/`."""
    if accelerator.is_main_process and len(val_volumes):
        unwrapped = accelerator.unwrap_model(model)
        out = Path(config.training.output_dir)
        try:  # the pipeline puts the model in eval mode; training must resume in train mode
            results = validate(unwrapped, val_volumes, config, out / "samples", state.step)
            metrics.log(state.step, results)
            if results["val_psnr"] > state.best_val_psnr:
                state.best_val_psnr = results["val_psnr"]
                export_model(unwrapped, out / "best", out)
        finally:
            unwrapped.train()
    accelerator.wait_for_everyone()
    # Every process must agree on the best PSNR, which is saved with the checkpoint.
    best = torch.tensor([state.best_val_psnr], device=accelerator.device)
    state.best_val_psnr = float(accelerator.reduce(best, reduction="max").item())
