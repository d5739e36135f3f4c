"""Set-up of a training run: the Accelerator, data, models, optimizers, schedules, resume."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from ..data.patch_dataset import RandomPatchDataset, VolumeStore
from ..data.phantom import write_phantom_dir
from ..data.prepare import prepare_dataset
from ..models.input_spec import describe_training_data
from .adversarial import Discriminators
from .checkpoints import resolve_checkpoint
from .config import TrainConfig, TrainingConfig
from .nonfinite import NonFiniteGuard
from .perceptual import PerceptualLoss2D, build_perceptual_loss
from .pretrained import build_generator, inference_patch
from .sampler import EpochShuffleSampler
from .schedules import adamw, critic_lr_factor, lr_factor

logger = get_logger(__name__)


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


@dataclass
class TrainingParts:
    """Everything a step needs, prepared by Accelerate (models wrapped for DDP where distributed)."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # the generator (VQGAN3D, possibly DDP-wrapped)
    opt_g: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    discriminators: torch.nn.Module | None  # None when the recipe has no critic
    opt_d: torch.optim.Optimizer | None
    sched_d: torch.optim.lr_scheduler.LRScheduler | None
    perceptual: PerceptualLoss2D | None
    dataset: RandomPatchDataset
    loader: DataLoader
    val_volumes: VolumeStore
    state: TrainState
    guard: NonFiniteGuard
    resumed_from: Path | None = None

    @property
    def critics(self) -> Discriminators | None:
        """The critics unwrapped from DDP: what the generator is trained against (frozen)."""
        return self.accelerator.unwrap_model(self.discriminators) if self.discriminators is not None else None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)


def build_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator of a run: device, accumulation, trackers, process-group timeout, compile."""
    out = Path(config.training.output_dir)
    return Accelerator(
        cpu=config.training.cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=config.training.ddp_timeout_minutes))],
        dynamo_backend="inductor" if config.training.compile else None,
    )


def configure_backends(training: TrainingConfig, device: torch.device) -> None:
    """TF32 (`training.tf32`) and cuDNN's autotuner (`training.cudnn_benchmark`) on CUDA and, if asked,
    deterministic kernels (`training.deterministic`)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = training.tf32
        torch.backends.cudnn.allow_tf32 = training.tf32
        torch.backends.cudnn.benchmark = training.cudnn_benchmark and not training.deterministic
    if training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.backends.cudnn.benchmark = False
        # warn_only: CUDA has no deterministic backward of 3D nearest upsampling; torch warns there.
        torch.use_deterministic_algorithms(True, warn_only=True)


def prepared_dataset_path(config: TrainConfig) -> Path:
    """The prepared dataset a run trains on: `dataset.path`, or its synthetic phantoms' under the output folder."""
    return Path(config.dataset.path) if config.dataset.path else Path(config.training.output_dir) / "phantom_dataset"


def phantom_dir(config: TrainConfig) -> Path:
    """Where a run with no `dataset.path` writes its synthetic phantoms (`phantom_000.nii.gz`, ...)."""
    return Path(config.training.output_dir) / "phantoms"


def volume_stores(config: TrainConfig, accelerator: Accelerator) -> tuple[VolumeStore, VolumeStore]:
    """The prepared train/validation splits; with no `dataset.path`, synthetic phantoms made once."""
    data = config.dataset
    path = prepared_dataset_path(config)
    if data.path is None:
        with accelerator.main_process_first():
            if accelerator.is_main_process and not path.exists():
                raw = phantom_dir(config)
                write_phantom_dir(raw, data.phantoms, data.phantom_shape, seed=config.training.seed)
                prepare_dataset(raw, path, data.val_fraction, data.max_patients, seed=config.training.seed)
    elif not path.exists():
        raise FileNotFoundError(f"{path}: dataset.path does not exist (create it with `ctpa-vq prepare`)")
    train, val = VolumeStore.from_disk(path, "train"), VolumeStore.from_disk(path, "validation")
    if data.path is not None and data.max_patients is not None:
        # A contiguous `select` slices the Arrow table: no copy of the volumes.
        train = VolumeStore(train.dataset.select(range(min(data.max_patients, len(train)))))
    return train, val


def training_data_record(
    volumes: VolumeStore, hu_window: Sequence[float], config: TrainConfig, measured: int = 16
) -> dict:
    """The input specification of the training split that every export carries (`ctpa_vq.models.input_spec`):
    spacings of all volumes, the clipped fraction of up to `measured` volumes spread over the split."""
    picks = np.unique(np.linspace(0, len(volumes) - 1, min(measured, len(volumes))).round().astype(int))
    sample = (volumes.volume(int(i)) for i in picks)
    return describe_training_data(volumes.spacings, sample, hu_window, config.dataset.patch_size)


def build_training(config: TrainConfig, accelerator: Accelerator | None = None) -> TrainingParts:
    """Build and `prepare` every part of a run from its recipe (a fresh run, at step 0)."""
    accelerator = accelerator or build_accelerator(config)
    configure_backends(config.training, accelerator.device)
    set_seed(config.training.seed, device_specific=True)
    train_volumes, val_volumes = volume_stores(config, accelerator)
    with accelerator.main_process_first():  # a Hub model is downloaded once, then read from the cache
        model = build_generator(config.model)
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    dataset = RandomPatchDataset(
        train_volumes,
        patch_size=config.dataset.patch_size,
        patches_per_volume=config.dataset.patches_per_volume,
        seed=config.training.seed,
        min_foreground_fraction=config.dataset.min_foreground_fraction,
    )  # (raises on an empty split)
    model.register_to_config(
        training_data=training_data_record(train_volumes, model.config.hu_window, config),
        inference_patch_size=inference_patch(model.config.norm_type, config.dataset.patch_size),
    )
    loader = DataLoader(
        dataset,
        batch_size=config.training.batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed=config.training.seed),
        num_workers=config.dataset.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        drop_last=True,
    )
    # Fused AdamW: it takes the non-finite guard's `found_inf` flag on the device (no host sync).
    g, d, gan, total = config.optimizer, config.critic_optimizer, config.gan, config.training.max_steps
    opt_g = adamw([p for p in model.parameters() if p.requires_grad], g, fused=True)  # frozen parts: no state
    sched_g = torch.optim.lr_scheduler.LambdaLR(
        opt_g, partial(lr_factor, warmup=g.warmup_steps, total=total, floor=g.min_lr_ratio)
    )
    model, opt_g, loader = accelerator.prepare(model, opt_g, loader)
    discriminators = opt_d = sched_d = None
    if gan.uses_discriminator:
        discriminators = Discriminators.from_gan_config(gan)
        opt_d = adamw(discriminators.parameters(), d, fused=True)
        critic_schedule = partial(
            critic_lr_factor, start=gan.start_step, warmup=d.warmup_steps, total=total, floor=d.min_lr_ratio
        )
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, critic_schedule)
        discriminators, opt_d = accelerator.prepare(discriminators, opt_d)
    perceptual = build_perceptual_loss(gan.perceptual_weights) if gan.perceptual_weight > 0 else None
    if perceptual is not None:
        perceptual.to(accelerator.device)
    state = TrainState(world_size=accelerator.num_processes)
    # The schedulers step once per optimizer step whatever the world size, so they are not
    # handed to `prepare` (which would step them once per process).
    accelerator.register_for_checkpointing(state, sched_g, *([sched_d] if sched_d else []))
    return TrainingParts(
        config=config,
        accelerator=accelerator,
        model=model,
        opt_g=opt_g,
        sched_g=sched_g,
        discriminators=discriminators,
        opt_d=opt_d,
        sched_d=sched_d,
        perceptual=perceptual,
        dataset=dataset,
        loader=loader,
        val_volumes=val_volumes,
        state=state,
        guard=NonFiniteGuard(accelerator.device, config.training.max_nonfinite_steps),
    )


def resume_training(parts: TrainingParts, resume: str | None) -> None:
    """Load `resume` (`"latest"` or a checkpoint folder) into `parts`, if there is one."""
    accelerator, state = parts.accelerator, parts.state
    root = parts.output_dir / "checkpoints"
    start = resolve_checkpoint(root, resume)
    if resume is not None and start is None:
        logger.info(f"no checkpoint under {root} yet: starting from scratch", main_process_only=True)
    if start is None:
        return
    accelerator.load_state(str(start))
    if state.world_size != accelerator.num_processes:
        logger.warning(
            f"resuming a {state.world_size}-process checkpoint on {accelerator.num_processes} processes: "
            "model, codebook, optimizers and schedule carry over; per-process RNG streams restart",
            main_process_only=True,
        )
        state.world_size = accelerator.num_processes
    parts.guard = NonFiniteGuard(accelerator.device, parts.config.training.max_nonfinite_steps, state.step)
    parts.resumed_from = start
    logger.info(f"resumed from {start} at step {state.step}", main_process_only=True)
