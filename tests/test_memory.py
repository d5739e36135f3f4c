"""Predicted GPU memory of a training step, traced on fake tensors (no GPU needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ctpa_vq.models import VQGAN3D
from ctpa_vq.training.config import load_config
from ctpa_vq.training.memory import (
    GIB, CudaAutocastRules, predict_step_memory, predict_validation_memory, validation_patch, with_knob,
)
from ctpa_vq.training.verify import verify_environment

TINY = ["model.preset=tiny", "dataset.patch_size=[16,32,32]", "training.batch_size=1", "gan.start_step=0",
        "gan.image_gan_weight=1.0", "gan.volume_gan_weight=0.5", "gan.perceptual_weight=0.1", "gan.base_channels=8",
        "gan.n_layers=2"]


@pytest.fixture(scope="module")
def tiny():
    return load_config(None, TINY)


def _static_bytes(config) -> int:
    """Parameters and the two AdamW moments of the generator, fp32: alive during the whole step."""
    params = sum(p.numel() for p in VQGAN3D.from_preset(config.model.preset).parameters())
    return 3 * 4 * params


def test_peak_holds_weights_adam_moments_and_the_first_activation(tiny):
    """Lower bound from first principles: weights + 2 Adam moments (fp32), plus the input conv's
    output (B, C0, D/2, H/2, W/2) in fp32 (it strides by 2), which the next conv keeps for backward.
    DDP adds one fp32 copy of the weights (its gradient buckets)."""
    predicted = predict_step_memory(tiny, "no", gan_stage=False, num_processes=4)
    voxels = 16 * 32 * 32 // 8
    first_activation = 4 * voxels * VQGAN3D.from_preset("tiny").config.block_out_channels[0]
    assert predicted.traced_peak >= _static_bytes(tiny) + first_activation
    assert predicted.breakdown["Optstate"] == pytest.approx(2 * _static_bytes(tiny) / 3, rel=0.01)
    assert predicted.ddp_buckets == _static_bytes(tiny) // 3
    assert predicted.per_process > predicted.allocated == predicted.traced_peak + predicted.ddp_buckets


def test_activations_scale_with_batch_and_patch_voxels(tiny):
    """Doubling the batch or the patch depth about doubles what the step adds above the weights."""
    def activations(**knobs):
        config = with_knob(tiny, **knobs)
        return predict_step_memory(config, "no", gan_stage=False).traced_peak - _static_bytes(config)

    base = activations()
    assert 1.7 < activations(training__batch_size=2) / base < 2.3
    assert 1.7 < activations(dataset__patch_size=(32, 32, 32)) / base < 2.3


def test_bf16_and_checkpointing_lower_the_peak_and_the_gan_stage_raises_it(tiny):
    # a patch whose activations outweigh the 0.5 M model's weights and AdamW moments
    tiny = with_knob(tiny, dataset__patch_size=(32, 64, 64))
    fp32 = predict_step_memory(tiny, "no", gan_stage=False)
    bf16 = predict_step_memory(tiny, "bf16", gan_stage=False)
    checkpointed = predict_step_memory(with_knob(tiny, model__gradient_checkpointing=True), "bf16", gan_stage=False)
    gan = predict_step_memory(tiny, "bf16", gan_stage=True)
    assert fp32.traced_peak > bf16.traced_peak > checkpointed.traced_peak
    assert bf16.breakdown["Activation"] > checkpointed.breakdown["Activation"]
    assert gan.traced_peak > bf16.traced_peak
    assert gan.breakdown["Parameter"] > bf16.breakdown["Parameter"]  # the critics and VGG16
    assert gan.breakdown["Optstate"] > bf16.breakdown["Optstate"]  # the critics' AdamW


class _DtypeLog(TorchDispatchMode):
    """(op, output dtypes) of every operation that makes tensors."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        dtypes = [o.dtype for o in outs if isinstance(o, torch.Tensor)]
        if dtypes:
            self.ops.append((str(func), dtypes))
        return out


def _encoder_ops(device: str) -> list:
    with torch.device("meta"):
        encoder = VQGAN3D.from_preset("tiny").encoder
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        encoder.to_empty(device=device).requires_grad_(False)
        x = torch.empty(1, 1, 8, 16, 16, device=device)
        log = _DtypeLog()
        if device == "cuda":  # CUDA's own autocast on fake CUDA tensors (forward only, no autograd)
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            torch.autocast_increment_nesting()
            try:
                with log:
                    encoder(x)
            finally:
                torch.autocast_decrement_nesting()
                torch.set_autocast_enabled("cuda", False)
                torch.clear_autocast_cache()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocastRules(), log:
                encoder(x)
    return log.ops


def test_cpu_autocast_with_cuda_rules_casts_like_cuda_autocast():
    """The traced bf16 step makes the same casts, op by op, as CUDA's autocast would."""
    assert _encoder_ops("cpu") == _encoder_ops("cuda")


def test_cuda_rules_keep_group_norm_in_float32_under_cpu_autocast():
    x, conv = torch.randn(1, 4, 4, 4, 4), torch.nn.Conv3d(4, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(conv(x), 2).dtype == torch.bfloat16  # the CPU's own rule
        with CudaAutocastRules():
            assert F.group_norm(conv(x), 2).dtype == torch.float32
            assert conv(x).dtype == torch.bfloat16


@pytest.mark.slow
def test_ctpa_512_fp32_generator_step_matches_the_reference_figure():
    """Issue 10's reference, traced independently: ctpa-512 generator alone, batch 1, 128x256x256, AdamW,
    fp32, no checkpointing: about 104 GiB. The reference is the model of its time, GroupNorm and
    ResBlocks at full resolution (the preset traces to about 27 GiB)."""
    config = load_config(
        None,
        ["model.preset=ctpa-512", "model.overrides.norm_type=group", "model.overrides.full_resolution_blocks=true",
         "dataset.patch_size=[128,256,256]", "training.batch_size=1"],
    )  # fmt: skip
    predicted = predict_step_memory(config, "no", gan_stage=False)
    assert predicted.traced_peak / GIB == pytest.approx(104, abs=1.5)


def test_validation_peak_holds_the_training_state_and_grows_with_val_batch_size(tiny):
    """Validation's fp32 forward sits on top of the weights and Adam moments; its activations scale with
    the batch: at least the decoder's output, (val_batch_size, 1, *patch) in fp32."""
    shape = (40, 80, 96)
    patch = validation_patch(tiny, shape)
    assert patch == (16, 32, 32)  # the run's training patch, which the model stores as its inference patch
    assert validation_patch(with_knob(tiny, model__overrides={"norm_type": "group"}), shape) == shape  # planned
    peaks = {b: predict_validation_memory(with_knob(tiny, training__val_batch_size=b), shape, gan_stage=False)
             for b in (1, 2, 4)}
    for batch, predicted in peaks.items():
        assert predicted.traced_peak >= _static_bytes(tiny) + 4 * batch * 16 * 32 * 32
        assert predicted.breakdown["Gradient"] == 0  # no backward, gradients freed after the step
    above = {b: p.traced_peak - _static_bytes(tiny) for b, p in peaks.items()}
    assert above[4] / above[2] == pytest.approx(2, rel=0.15) and above[2] / above[1] == pytest.approx(2, rel=0.15)


def _gib(detail: str) -> float:
    return float(detail.split(" GiB per process")[0].rsplit(" ", 1)[-1])


def test_verify_prints_the_validation_peak_beside_the_training_peak(tiny):
    # GroupNorm: validation runs the planned grid, here the whole volume, larger than the training patch
    planned = with_knob(tiny, model__overrides={"norm_type": "group"})
    figures = {}
    for batch in (1, 4):
        config = with_knob(planned, training__val_batch_size=batch)
        checks = {check.name: check for check in verify_environment(config, gpu_memory_gib=80)}
        assert checks["GPU memory"].status == "PASS"
        validation = checks["validation GPU memory"]
        assert validation.status == "PASS" and f"val_batch_size {batch}" in validation.detail
        assert "48x96x96 volume" in validation.detail  # the phantoms training validates on without a dataset
        figures[batch] = _gib(validation.detail)
    assert figures[4] > figures[1]
    # A card the training step fits but validation at val_batch_size 4 does not: verify fails on validation.
    config = with_knob(planned, training__val_batch_size=4)
    step = predict_step_memory(config, "no", gan_stage=True).per_process / GIB
    assert step < figures[4] - 0.1
    checks = {c.name: c for c in verify_environment(config, gpu_memory_gib=(step + figures[4]) / 2)}
    assert checks["GPU memory"].status == "PASS"
    assert checks["validation GPU memory"].status == "FAIL" and "val_batch_size" in checks["validation GPU memory"].detail
