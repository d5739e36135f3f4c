"""Predicted peak GPU memory of one training step, on a machine without a GPU.

One optimizer step of the recipe (generator forward/backward, AdamW step, then the critics'
step once the GAN stage is on; the losses are training's own, `steps.generator_loss` and
`steps.critic_loss`) runs on fake tensors: torch's ``FakeTensorMode`` gives every
tensor a shape, dtype and device but no storage, and
``torch.distributed._tools.mem_tracker.MemTracker`` adds up the storages alive at each
operation. What it counts is what ``torch.cuda.max_memory_allocated`` reports for the same
step on a GPU; :class:`StepMemory` adds what it does not
see (DDP gradient buckets, the allocator's fragmentation, the CUDA context) for the figure to
compare with a card's memory.

The fake tensors live on the CPU: on a CPU-only build, autograd cannot record a graph of fake
CUDA tensors (it asks for a CUDA device guard), and ``torch.autocast("cuda")`` switches itself
off. Mixed precision is therefore the CPU's bf16 autocast with CUDA's casting rules where the two
differ for the ops these models use (:class:`CudaAutocastRules`: CUDA runs GroupNorm in fp32, so a
bf16 step keeps fp32 normalisation activations; the CPU would not). The 512-byte rounding of the
CUDA caching allocator is not applied (a few MiB over thousands of tensors).

Host reads of tensor values cannot be faked (a fake tensor has no values); the step's few
(finite-input check, codebook initialised, number of dead codes, code histogram) are answered as
in a healthy step by :class:`_HealthyStepValues`. None of them changes a tensor size that matters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from ..models import VQGAN3D
from ..models.intensity import hu_to_unit
from ..pipelines import CTPAReconstructionPipeline
from .adversarial import Discriminators
from .config import TrainConfig
from .perceptual import PerceptualLoss2D
from .pretrained import generator_config, inference_patch
from .schedules import adamw
from .steps import critic_loss, generator_loss

GIB = 2**30

# What a GPU process holds besides the tensors the trace counts. Both figures are typical of
# PyTorch 2.x with CUDA 12 on H100/H200 and are deliberately on the safe side:
#  * the CUDA context, cuBLAS/cuDNN handles and their workspaces: about 0.5-1 GiB per process;
#  * the caching allocator's reserved-but-unallocated blocks (fragmentation): 5-15 % of the peak.
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class StepMemory:
    """Peak GPU memory of one training step of one process.

    Attributes:
        traced_peak: bytes of tensors alive at the step's peak (``max_memory_allocated``).
        breakdown: the traced peak by kind (parameters, gradients, optimizer states,
            activations, temporaries, buffers, inputs), bytes.
        ddp_buckets: DDP's gradient buckets (one fp32 copy of each wrapped model's gradients),
            allocated when the model is wrapped, outside the trace; 0 for one process.
        trace_seconds: wall time of the trace.
    """

    traced_peak: int
    breakdown: dict[str, int] = field(default_factory=dict)
    ddp_buckets: int = 0
    trace_seconds: float = 0.0

    @property
    def allocated(self) -> int:
        """Tensor bytes at the peak, DDP buckets included."""
        return self.traced_peak + self.ddp_buckets

    @property
    def per_process(self) -> int:
        """What to compare with a GPU's memory: allocated + fragmentation + CUDA context."""
        return int(self.allocated * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in self.breakdown.items() if size >= GIB / 100)
        ddp = f" + DDP buckets {self.ddp_buckets / GIB:.2f}" if self.ddp_buckets else ""
        return (
            f"{self.per_process / GIB:.1f} GiB per process = tensors at the peak {self.traced_peak / GIB:.2f} GiB "
            f"({parts}){ddp}, +{FRAGMENTATION:.0%} allocator fragmentation, +{CUDA_CONTEXT_BYTES / GIB:.1f} GiB "
            f"CUDA context"
        )


def predict_step_memory(
    config: TrainConfig, mixed_precision: str = "bf16", gan_stage: bool = True, num_processes: int = 1
) -> StepMemory:
    """Trace one optimizer step of ``config`` on fake CUDA tensors and return its peak memory.

    Args:
        config: the recipe: model preset and overrides, gradient checkpointing, batch size
            (per process), patch size, GAN weights.
        mixed_precision: ``"bf16"`` (CUDA bf16 autocast, as ``accelerate`` applies it) or ``"no"``.
        gan_stage: trace a step after ``gan.start_step`` (critics with a positive weight, and the
            perceptual network when ``gan.perceptual_weight > 0``); else the reconstruction stage.
        num_processes: processes of the run; above 1 the models are DDP-wrapped (buckets).
    """
    if mixed_precision not in ("bf16", "no"):
        raise ValueError(f"mixed_precision must be 'bf16' or 'no', got {mixed_precision!r}")
    autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None

    def step(parts: _StepParts) -> None:
        with CudaAutocastRules():
            _train_step(parts, config, autocast_dtype)

    return _trace(config, gan_stage, num_processes, step)


def _trace(config: TrainConfig, gan_stage: bool, num_processes: int, run: Callable[[_StepParts], None]) -> StepMemory:
    """`run` on the fake models and optimizers of ``config``, under the memory tracker: its peak."""
    start = time.perf_counter()
    parts = _StepParts.build(config, gan_stage)
    # Non-fake inputs: the meta-device modules, whose storage `to_fake` replaces.
    with FakeTensorMode(allow_non_fake_inputs=True):
        parts.to_fake(config)
        tracker = _MemTracker()
        tracker.track_external(*parts.modules, *parts.optimizers)
        with tracker, _HealthyStepValues():
            run(parts)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    breakdown = {getattr(kind, "value", kind): size for kind, size in peak.items() if kind != "Total"}
    trained = [parts.model] + ([parts.critics] if parts.opt_d is not None else [])
    buckets = sum(4 * p.numel() for m in trained for p in m.parameters() if p.requires_grad)
    return StepMemory(
        traced_peak=peak["Total"],
        breakdown=breakdown,
        ddp_buckets=buckets if num_processes > 1 else 0,
        trace_seconds=time.perf_counter() - start,
    )


def validation_patch(config: TrainConfig, volume_shape: Sequence[int]) -> tuple[int, int, int]:
    """The patch validation runs on a ``(D, H, W)`` volume: the pipeline's grid with the recipe's
    `val_patch_size`, `val_overlap` and `val_max_patch_voxels` (by default the inference patch the
    run's generator records, `pretrained.inference_patch`)."""
    with torch.device("meta"):
        model = VQGAN3D(**generator_config(config.model))
    model.register_to_config(inference_patch_size=inference_patch(model.config.norm_type, config.dataset.patch_size))
    training = config.training
    grid = CTPAReconstructionPipeline(model).patch_grid(
        volume_shape, training.val_patch_size, training.val_overlap, training.val_max_patch_voxels
    )
    return tuple(grid.patch_size)


def predict_validation_memory(
    config: TrainConfig, volume_shape: Sequence[int], gan_stage: bool = True, num_processes: int = 1
) -> StepMemory:
    """Peak GPU memory while validation reconstructs a ``(D, H, W)`` volume during training.

    What stays allocated from training (weights, AdamW moments, the critics and their optimizer,
    the perceptual network, DDP buckets; gradients are freed by ``zero_grad(set_to_none=True)``)
    plus one float32, no-grad forward of the pipeline (encode, quantise, decode) on
    `training.val_batch_size` patches of `validation_patch`, traced on fake tensors as
    :func:`predict_step_memory` traces a step. Scoring on the device (SSIM slabs, a few hundred
    MiB) comes after the forward and is smaller.
    """
    patch = validation_patch(config, volume_shape)

    def forward(parts: _StepParts) -> None:
        model = parts.model.eval()  # as the pipeline runs it
        with torch.no_grad():
            patches = torch.empty((config.training.val_batch_size, 1, *patch))  # the stitcher's batch on the device
            model.decode(model.quantize(model.encode(patches))[0])

    return _trace(config, gan_stage, num_processes, forward)


@dataclass
class _StepParts:
    """The models and optimizers of one process, as fake tensors."""

    model: VQGAN3D
    opt_g: torch.optim.Optimizer | None = None
    critics: Discriminators | None = None
    opt_d: torch.optim.Optimizer | None = None
    perceptual: PerceptualLoss2D | None = None

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.model, self.critics, self.perceptual) if m is not None]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_g, self.opt_d) if o is not None]

    @classmethod
    def build(cls, config: TrainConfig, gan_stage: bool) -> _StepParts:
        """Modules built on the meta device (no initialisation), to be given fake storage by `to_fake`."""
        gan = config.gan
        with torch.device("meta"):
            parts = cls(VQGAN3D(**generator_config(config.model)))
            if gan_stage and gan.uses_discriminator:
                parts.critics = Discriminators.from_gan_config(gan)
            if gan_stage and gan.perceptual_weight > 0:
                parts.perceptual = PerceptualLoss2D()
        if config.model.gradient_checkpointing:
            parts.model.enable_gradient_checkpointing(_checkpoint_with_cuda_rules)
        return parts

    def to_fake(self, config: TrainConfig) -> None:
        """Fake storage for every module (inside `FakeTensorMode`), and the optimizers' state."""
        for module in self.modules:
            module.to_empty(device="cpu")
        # foreach=True: what AdamW picks by default for CUDA tensors (its temporaries count).
        self.opt_g = adamw(self.model.parameters(), config.optimizer, foreach=True)
        if self.critics is not None:
            self.opt_d = adamw(self.critics.parameters(), config.critic_optimizer, foreach=True)
        for optimizer in self.optimizers:  # steady state: the Adam moments exist from step 2 on
            _allocate_state(optimizer)


def _checkpoint_with_cuda_rules(module: torch.nn.Module, *args) -> torch.Tensor:
    """diffusers' checkpointing, with `CudaAutocastRules` also in the recompute (the backward pass
    does not see the function modes of the forward)."""

    def run(*inputs):
        with CudaAutocastRules():
            return module(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def _allocate_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (a step on zero gradients), then drop the gradients."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train_step(parts: _StepParts, config: TrainConfig, autocast_dtype: torch.dtype | None) -> None:
    """One optimizer step as the loop takes it (with its losses, `steps.py`), on a batch of int16 HU patches."""
    shape = (config.training.batch_size, 1, *config.dataset.patch_size)
    hu = torch.empty(shape, dtype=torch.int16)  # the batch as the data loader hands it over
    x = hu_to_unit(hu, parts.model.config.hu_window)
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    with autocast:
        generated = generator_loss(parts.model, x, config, parts.critics, parts.perceptual)
    generated.loss.backward()
    _clip_and_step(parts.opt_g, parts.model, config.optimizer.grad_clip)
    generated = generated.detach()  # as `generator_step` hands it to the critics' step
    if parts.critics is not None:
        with autocast:
            d_loss = critic_loss(parts.critics, x, generated)
        d_loss.backward()
        _clip_and_step(parts.opt_d, parts.critics, config.critic_optimizer.grad_clip)


def _clip_and_step(optimizer: torch.optim.Optimizer, module: torch.nn.Module, grad_clip: float) -> None:
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Ops that CUDA's autocast runs in float32 but the CPU's in bf16, among those these models call.
_CUDA_FLOAT32_OPS = frozenset({F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm})


class CudaAutocastRules(TorchFunctionMode):
    """Under CPU bf16 autocast, run the ops CUDA's autocast keeps in float32 in float32 too.

    Sits above autograd (a function mode), like autocast itself: the float32 copies of the
    inputs are what the op saves for backward, as on a GPU.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CUDA_FLOAT32_OPS and torch.is_autocast_enabled("cpu"):
            to_float = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map_only(torch.Tensor, to_float, (args, kwargs))
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class _MemTracker(MemTracker):
    """`MemTracker` for a GAN step. Its per-module statistics (which this module does not use)
    refuse two patterns the step has; the totals it tracks are unaffected by allowing them:

    * frozen modules (the perceptual network, the critics during the generator's step): it puts
      a gradient hook on every parameter of a module it first sees, which a parameter without
      gradient refuses. Gradients of such modules are then counted with the temporaries.
    * a top-level module called twice in one step (a critic on the real, then the fake input):
      it takes that for the next iteration and stops.

    Only the step's overall peak is kept up to date per operation (the per-module peaks cost
    half the trace time and are not used).
    """

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        trainable = all(p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    def _pre_fw_hook(self, module, inputs):
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            return  # called again in this step: its parameters are tracked already
        super()._pre_fw_hook(module, inputs)


class _HealthyStepValues(TorchDispatchMode):
    """Answers the step's host reads of tensor values as in a healthy step.

    ``bool(t)`` of a check is True (finite input, codebook initialised); a count read with
    ``int(t)`` is 0 (no dead codes to restart); a value the fake tensor knows (made from a
    Python number, like AdamW's step count) is that value.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            try:  # a fake tensor made from a Python number (e.g. AdamW's step count) knows its value
                return func(*args, **kwargs)
            except DataDependentOutputException:
                return True if args[0].dtype == torch.bool else 0
        return func(*args, **kwargs)


def with_knob(config: TrainConfig, **changes) -> TrainConfig:
    """A copy of ``config`` with ``section__field=value`` changes, e.g. ``training__batch_size=1``."""
    sections: dict[str, dict] = {}
    for key, value in changes.items():
        section, name = key.split("__")
        sections.setdefault(section, {})[name] = value
    return replace(config, **{s: replace(getattr(config, s), **f) for s, f in sections.items()})
