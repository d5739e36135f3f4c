"""The training recipe as typed dataclasses, read from YAML plus dotted command-line overrides.

OmegaConf does the parsing and type checking: `load_config("configs/demo.yaml",
["optimizer.lr=1e-4", "dataset.max_patients=null"])` returns a `TrainConfig` whose fields have
the declared types, and an unknown key or a wrong type is an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    """The generator and its reconstruction loss.

    A fresh run builds `preset` (null: "tiny") with `overrides`. With `pretrained` (a saved pipeline
    or model folder, or ORG/NAME[@REVISION] on the Hub) the run starts from that model: its weights,
    EMA codebook and architecture; a `preset` or override that contradicts it is an error, and only
    the quantizer's training settings may change (see `training/pretrained.py`). `freeze` names the
    parts that stay as they are: `encoder`, `quantizer`, `decoder`.
    """

    preset: Optional[str] = None  # null: "tiny" for a fresh run; the pretrained model's own with `pretrained`
    overrides: dict[str, Any] = field(default_factory=dict)  # any VQGAN3D config field
    pretrained: Optional[str] = None  # PATH | ORG/NAME[@REVISION]: start from this trained model
    freeze: list[str] = field(default_factory=list)  # e.g. [encoder, quantizer]: no gradients, no codebook updates
    gradient_checkpointing: bool = False
    l1_weight: float = 4.0
    dense_weight: float = 1.0  # L1 weight of voxels >= dense_threshold_hu (vessels, bone); 1: plain L1
    dense_threshold_hu: float = 150.0
    ssim_weight: float = 0.0  # adds ssim_weight * (1 - 3D SSIM) to the reconstruction loss; 0: off


@dataclass
class OptimizerConfig:
    """One AdamW and its schedule: a linear warm-up over `warmup_steps`, then a cosine decay to
    lr * min_lr_ratio at training.max_steps (the critics' starts at gan.start_step, LR 0 before)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # the global gradient norm is clipped to this; 0 = no clipping


@dataclass
class GANConfig:
    """The staged adversarial part: off until `start_step`, then the weights below apply.

    The critics' optimiser is the recipe's `critic_optimizer`."""

    start_step: int = 10_000
    image_gan_weight: float = 0.0  # 2D PatchGAN on random axial slices
    volume_gan_weight: float = 0.0  # 3D PatchGAN on the whole patch
    feature_matching_weight: float = 4.0
    perceptual_weight: float = 0.0
    perceptual_weights: Optional[str] = None  # local .safetensors / dir, or a Hub repo id
    slices_per_volume: int = 4
    base_channels: int = 64  # both critics: PatchDiscriminator's width and depth
    n_layers: int = 3

    @property
    def uses_discriminator(self) -> bool:
        return self.image_gan_weight > 0 or self.volume_gan_weight > 0


@dataclass
class DatasetConfig:
    """Where volumes come from and how patches are drawn."""

    path: Optional[str] = None  # a `ctpa-vq prepare` output; None -> synthetic phantoms
    phantoms: int = 10
    phantom_shape: tuple[int, int, int] = (48, 96, 96)
    val_fraction: float = 0.2
    max_patients: Optional[int] = None
    patch_size: tuple[int, int, int] = (32, 64, 64)
    patches_per_volume: int = 8
    min_foreground_fraction: float = 0.2
    num_workers: int = 0


@dataclass
class TrainingConfig:
    """The loop: length, batching, checkpoints, validation, logging."""

    output_dir: str = "outputs/demo"
    cpu: bool = False  # train on CPU processes even where CUDA is available (always so without CUDA)
    seed: int = 0
    max_steps: int = 400
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # >= 1: the newest N are kept (and the one a run resumed from, always)
    validate_every: int = 100
    log_every: int = 10
    val_max_volumes: Optional[int] = 4  # the first N validation volumes, shared out across processes; null = all
    val_patch_size: Optional[tuple[int, int, int]] = None  # null: the pipeline default, as users infer (the model's inference patch, else planned)
    val_overlap: Optional[float] = None  # with val_patch_size: a fraction of the patch (null: 0.25)
    val_max_patch_voxels: Optional[int] = None  # the budget per patch (null: the pipeline's default, as users infer)
    val_blend: str = "linear"
    val_batch_size: int = 4
    stop_at_step: Optional[int] = None  # end early (after checkpointing) without changing the schedule
    max_nonfinite_steps: int = 10  # stop after this many skipped (non-finite) steps in a row
    ddp_timeout_minutes: int = 30  # process-group timeout: a collective waits this long for the slowest process
    compile: bool = False  # torch.compile the generator and the critics (Accelerate's dynamo backend, inductor)
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (no effect on CPU)
    # cuDNN times its convolution algorithms per input shape and keeps the fastest (fixed patches: once);
    # off under `deterministic`
    cudnn_benchmark: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; warns where CUDA has no such kernel)

    def __post_init__(self) -> None:
        for name in ("keep_checkpoints", "max_nonfinite_steps", "ddp_timeout_minutes", "checkpoint_every",
                     "validate_every", "log_every", "batch_size", "gradient_accumulation_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class HubConfig:
    """Pushes to a (private) Hub repo during training; nothing while `repo_id` is None (see training/hub_sync.py)."""

    repo_id: Optional[str] = None
    private: bool = True
    push_best: bool = True  # the best validation export, each time it improves
    push_end: bool = True  # the final export
    push_checkpoints: bool = False  # resumable training state (holds pickles), to `checkpoints_branch`
    checkpoints_branch: str = "checkpoints"
    endpoint: Optional[str] = None  # default: HF_ENDPOINT or huggingface.co


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # the generator's
    gan: GANConfig = field(default_factory=GANConfig)
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(warmup_steps=500))  # the critics'
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    hub: HubConfig = field(default_factory=HubConfig)


# Keys of older recipes and where each one went: a recipe (or override) with one is an error
# naming the new key, rather than a silent second spelling.
_MOVED_OPTIMIZER_KEYS = ("lr", "betas", "weight_decay", "warmup_steps", "min_lr_ratio")
RENAMED_KEYS = {
    "gan.video_gan_weight": "gan.volume_gan_weight",
    "gan.channels": "gan.base_channels",
    "gan.layers": "gan.n_layers",
    **{f"model.{name}": f"optimizer.{name}" for name in (*_MOVED_OPTIMIZER_KEYS, "grad_clip")},
    **{f"gan.{name}": f"critic_optimizer.{name}" for name in _MOVED_OPTIMIZER_KEYS},
}
_ABSENT = object()


def _reject_renamed_keys(recipe: Any, source: str) -> None:
    """Raise, naming `source` and every renamed key it holds with its new name."""
    if not isinstance(recipe, DictConfig):
        return
    found = [f"{old} is now {new}" for old, new in RENAMED_KEYS.items()
             if OmegaConf.select(recipe, old, default=_ABSENT) is not _ABSENT]  # fmt: skip
    if found:
        raise ValueError(f"{source}: recipe keys were renamed: {'; '.join(found)}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- YAML file <- `key.sub=value` overrides, type-checked into a `TrainConfig`."""
    merged = OmegaConf.structured(TrainConfig)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        recipe = OmegaConf.load(path)
        _reject_renamed_keys(recipe, str(path))
        merged = OmegaConf.merge(merged, recipe)
    dotted = OmegaConf.from_dotlist(list(overrides))
    _reject_renamed_keys(dotted, "command-line overrides")
    merged = OmegaConf.merge(merged, dotted)
    return OmegaConf.to_object(merged)


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved recipe, as saved next to checkpoints and pushed with the model."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
