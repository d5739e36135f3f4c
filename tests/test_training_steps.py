"""The training step in pieces, in-process on CPU: autocast, accumulation, the GAN stage, the
critics' schedule, the non-finite guard, host syncs, shuffling, and the loop's configuration."""

from __future__ import annotations

import csv
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file
from ssim_reference import ssim_full_kernel

from ctpa_vq.data.phantom import write_phantom_dir
from ctpa_vq.data.prepare import prepare_dataset
from ctpa_vq.training import NonFiniteLossError, load_config, losses, steps
from ctpa_vq.training.perceptual import PerceptualLoss2D
from ctpa_vq.training.loop import MetricWindow, on_sync, step_schedules, train
from ctpa_vq.training.metrics_log import MetricsLogger
from ctpa_vq.training.setup import build_accelerator, build_training, configure_backends
from ctpa_vq.training.steps import model_input, train_micro_batch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Five small phantoms, prepared once for the module (4 train, 1 validation)."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dir(root / "raw", 5, (24, 48, 48), seed=0)
    prepare_dataset(root / "raw", root / "prepared", 0.1, None, seed=0)  # the hash split: 4 train, 1 validation
    return root / "prepared"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator (mixed precision and accumulation are process-wide singletons)."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _config(prepared: Path, tmp_path: Path, *overrides: str):
    return load_config(DEMO, [
        f"dataset.path={prepared}", "dataset.patch_size=[16,32,32]", "dataset.patches_per_volume=2",
        "optimizer.warmup_steps=2", "gan.base_channels=8", "gan.n_layers=2", "gan.slices_per_volume=2",
        "training.batch_size=2", "training.max_steps=20", f"training.output_dir={tmp_path / 'run'}", *overrides,
    ])  # fmt: skip


def _batch(parts, size: int) -> torch.Tensor:
    return model_input(parts, {"hu": torch.stack([parts.dataset[i]["hu"] for i in range(size)])})


def _take_step(parts, x: torch.Tensor, micro_batch: int) -> dict:
    """One optimizer step of the loop (gradient_accumulation_steps=1): the step, the schedules, the count."""
    terms = train_micro_batch(parts, x, micro_batch)
    step_schedules(parts)
    parts.guard.end_step()
    parts.state.step += 1
    return terms


def _params(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ------------------------------------------------------------------------------ mixed precision


def test_bf16_autocast_covers_forward_and_losses_only_and_the_l1_sees_fp32(prepared, tmp_path):
    parts = build_training(_config(prepared, tmp_path), Accelerator(cpu=True, mixed_precision="bf16"))
    model = parts.accelerator.unwrap_model(parts.model)
    seen: dict[str, object] = {}

    def note(key, value) -> None:  # hooks must return None
        seen.setdefault(key, value)

    model.decoder.stages[0].register_forward_hook(lambda m, i, o: note("decoder_dtype", o.dtype))
    first = next(model.parameters())
    first.register_post_accumulate_grad_hook(lambda p: note("backward", torch.is_autocast_enabled("cpu")))
    parts.opt_g.optimizer.register_step_pre_hook(lambda *a: note("optimizer_step", torch.is_autocast_enabled("cpu")))
    clip = parts.accelerator.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        note("clip", torch.is_autocast_enabled("cpu"))
        return clip(*args, **kwargs)

    parts.accelerator.clip_grad_norm_ = recording_clip
    captured = {}
    from ctpa_vq.training import steps

    original = steps.generator_step

    def capturing(*args, **kwargs):
        captured["out"] = original(*args, **kwargs)
        return captured["out"]

    steps.generator_step = capturing
    try:
        _take_step(parts, _batch(parts, 2), 0)
    finally:
        steps.generator_step = original
    assert seen["decoder_dtype"] == torch.bfloat16, "the forward pass did not run under bf16 autocast"
    assert seen["backward"] is False and seen["clip"] is False and seen["optimizer_step"] is False
    reconstruction = captured["out"].reconstruction
    assert reconstruction.dtype == torch.float32
    # An output computed in bf16 holds only bf16-representable values; an fp32 one does not.
    assert (reconstruction.bfloat16().float() != reconstruction).float().mean() > 0.5


# ------------------------------------------------------------------------------ reconstruction loss


def _l1_term_and_batch(parts) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One step's logged terms, its input and the reconstruction the loss saw."""
    from ctpa_vq.training import steps

    captured, original = {}, steps.generator_step

    def capturing(*args, **kwargs):
        captured["out"] = original(*args, **kwargs)
        return captured["out"]

    steps.generator_step = capturing
    try:
        x = _batch(parts, 2)
        terms = _take_step(parts, x, 0)
    finally:
        steps.generator_step = original
    return terms, x, captured["out"].reconstruction


@pytest.mark.parametrize("dense_weight", [1.0, 5.0])
def test_recipe_dense_weight_and_threshold_in_hu_reach_the_reconstruction_loss(prepared, tmp_path, dense_weight):
    config = _config(prepared, tmp_path, f"model.dense_weight={dense_weight}", "model.dense_threshold_hu=-100")
    parts = build_training(config, Accelerator(cpu=True))
    low, high = parts.accelerator.unwrap_model(parts.model).config.hu_window
    terms, x, reconstruction = _l1_term_and_batch(parts)
    threshold = (-100 - low) / (high - low) * 2 - 1  # -100 HU in the model's [-1, 1] window
    dense = x >= threshold
    assert 0.05 < dense.float().mean() < 0.95, "the phantom patch should hold voxels on both sides"
    weight = torch.where(dense, dense_weight, 1.0)
    expected = ((reconstruction - x).abs() * weight).sum() / weight.sum()
    assert terms["l1"].item() == pytest.approx(expected.item(), rel=1e-5)
    total = config.model.l1_weight * expected.item() + terms["commitment"].item()
    assert terms["loss"].item() == pytest.approx(total, rel=1e-5)
    if dense_weight != 1.0:
        assert abs(terms["l1"].item() - (reconstruction - x).abs().mean().item()) > 1e-4, "still the plain L1"


def test_recipe_ssim_weight_adds_one_minus_ssim_to_the_loss(prepared, tmp_path):
    parts = build_training(_config(prepared, tmp_path, "model.ssim_weight=2.0"), Accelerator(cpu=True))
    terms, x, reconstruction = _l1_term_and_batch(parts)
    assert terms["ssim_loss"].item() == pytest.approx(1 - ssim_full_kernel(reconstruction, x).item(), abs=1e-5)
    plain_l1 = (reconstruction - x).abs().mean()
    expected = parts.config.model.l1_weight * plain_l1 + 2.0 * terms["ssim_loss"] + terms["commitment"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow  # the whole loop: two steps, validation, checkpoint and export
def test_the_loop_logs_the_ssim_term_to_metrics_csv(prepared, tmp_path):
    """`model.ssim_weight > 0` through `train`: its log step used to stop on a term metrics.csv had no column for."""
    config = _config(prepared, tmp_path, "model.ssim_weight=0.5", "training.max_steps=2", "training.log_every=1")
    train(config)
    with (tmp_path / "run" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row["loss"]]
    assert [int(row["step"]) for row in logged] == [1, 2]
    for row in logged:
        ssim, l1, commitment = float(row["ssim_loss"]), float(row["l1"]), float(row["commitment"])
        assert 0 < ssim < 1
        expected = config.model.l1_weight * l1 + commitment + 0.5 * ssim  # the logged term is the one in the loss
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)


def test_the_default_recipe_trains_on_plain_l1():
    config = load_config(DEMO)
    assert config.model.dense_weight == 1.0 and config.model.ssim_weight == 0.0


# ------------------------------------------------------------------------------ accumulation


def _grads_at_step(parts, micro_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = {}
    model = parts.accelerator.unwrap_model(parts.model)
    parts.opt_g.optimizer.register_step_pre_hook(
        lambda *a: grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}) or None
    )
    for i, x in enumerate(micro_batches):
        train_micro_batch(parts, x, i)
    return grads


def test_k_micro_batches_accumulate_to_one_batch_of_k(prepared, tmp_path):
    # A fixed codebook so both runs quantise against the same codes: initialised from the data
    # once, then the quantizer alone is put in eval mode (no EMA update, no restarts).
    frozen = ["optimizer.grad_clip=0"]
    big = build_training(_config(prepared, tmp_path, *frozen), Accelerator(cpu=True))
    x = _batch(big, 4)
    with torch.no_grad():
        big.model(x)
    big.accelerator.unwrap_model(big.model).quantizer.eval()
    state = {k: v.clone() for k, v in big.accelerator.unwrap_model(big.model).state_dict().items()}
    one_batch = _grads_at_step(big, [x])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    small = build_training(
        _config(prepared, tmp_path, *frozen, "training.gradient_accumulation_steps=4", "training.batch_size=1"),
        Accelerator(cpu=True, gradient_accumulation_steps=4),
    )
    small.accelerator.unwrap_model(small.model).load_state_dict(state)
    small.accelerator.unwrap_model(small.model).quantizer.eval()
    accumulated = _grads_at_step(small, [x[i : i + 1] for i in range(4)])
    assert one_batch.keys() == accumulated.keys() and len(one_batch) > 10
    for name in one_batch:
        # float32 summation order differs (one batch of 4 vs 4 of 1). Without normalisation (the
        # presets' default) the gradients are sums of L1 sign terms that nearly cancel: the
        # difference reaches 1.5e-4 of |grad| max (it was 1e-7 with GroupNorm). A wrong scaling of
        # the micro-batches (a missed 1/k, a dropped micro-batch) is 25% or more.
        scale = float(one_batch[name].abs().max())
        torch.testing.assert_close(accumulated[name], one_batch[name], rtol=1e-3, atol=1e-3 * scale, msg=name)


# ------------------------------------------------------------------------------ the GAN stage


def test_gan_stage_and_perceptual_loss_switch_on_at_start_step(prepared, tmp_path):
    weights = tmp_path / "vgg.safetensors"
    torch.manual_seed(0)
    save_file({k: v for k, v in PerceptualLoss2D().state_dict().items() if k.startswith("features.")}, weights)
    config = _config(
        prepared, tmp_path, "gan.start_step=2", "gan.image_gan_weight=1.0", "gan.volume_gan_weight=0.5",
        "gan.perceptual_weight=0.1", f"gan.perceptual_weights={weights}", "critic_optimizer.warmup_steps=1",
    )  # fmt: skip
    parts = build_training(config, Accelerator(cpu=True))
    critics = _params(parts.critics)
    x = _batch(parts, 2)
    for step in range(2):
        terms = _take_step(parts, x, step)
        assert set(terms) == {"l1", "commitment", "loss", "perplexity", "codebook_usage"}, step
    assert all(torch.equal(p, critics[n]) for n, p in _params(parts.critics).items())
    assert parts.opt_d.optimizer.state == {}

    terms = _take_step(parts, x, 2)
    assert {"perceptual", "g_adversarial", "feature_matching", "d_loss"} <= set(terms)
    assert terms["perceptual"] > 0
    expected = 4.0 * terms["l1"] + terms["commitment"] + 0.1 * terms["perceptual"]
    expected = expected + terms["g_adversarial"] + 4.0 * terms["feature_matching"]
    torch.testing.assert_close(terms["loss"], expected)
    # The logits' biases are exempt: while every logit lies inside the hinge margin [-1, 1], the
    # hinge loss's gradient on them is 0.5 * (-1 + 1) = 0 exactly.
    moved = {n for n, p in _params(parts.critics).items() if not torch.equal(p, critics[n])}
    still = sorted(set(critics) - moved - {"image.to_logits.bias", "volume.to_logits.bias"})
    assert still == [], f"critic parameters that did not move on the first GAN step: {still}"
    assert not any(p.requires_grad for p in parts.perceptual.parameters()) and not parts.perceptual.training


def test_critics_have_their_own_optimizer_and_warm_up_from_start_step(prepared, tmp_path):
    config = _config(
        prepared, tmp_path, "gan.start_step=5", "gan.image_gan_weight=1.0", "critic_optimizer.lr=1e-3",
        "critic_optimizer.warmup_steps=4", "critic_optimizer.betas=[0.0,0.99]", "critic_optimizer.weight_decay=0.01",
        "optimizer.lr=2e-3", "optimizer.warmup_steps=2",
    )  # fmt: skip
    parts = build_training(config, Accelerator(cpu=True))
    group = parts.opt_d.optimizer.param_groups[0]
    assert group["betas"] == (0.0, 0.99) and group["weight_decay"] == 0.01
    critic_lrs, generator_lrs = [], []
    for _ in range(10):  # the LR each optimizer step k = 0..9 uses
        critic_lrs.append(parts.sched_d.get_last_lr()[0])
        generator_lrs.append(parts.sched_g.get_last_lr()[0])
        step_schedules(parts)
    assert critic_lrs[:5] == [0.0] * 5
    assert critic_lrs[5:9] == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3, 4)])  # warm-up from start_step
    assert critic_lrs[9] <= 1e-3  # then the cosine decay
    assert generator_lrs[:2] == pytest.approx([1e-3, 2e-3])  # the generator's own warm-up from step 0


def test_generator_and_critics_clip_to_their_own_grad_clip(prepared, tmp_path):
    config = _config(
        prepared, tmp_path, "gan.start_step=0", "gan.image_gan_weight=1.0", "optimizer.grad_clip=0.5",
        "critic_optimizer.grad_clip=0.25",
    )  # fmt: skip
    parts = build_training(config, Accelerator(cpu=True))
    generator = {id(p) for p in parts.model.parameters()}
    clipped = []
    clip = parts.accelerator.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped.append(("generator" if id(parameters[0]) in generator else "critics", max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    parts.accelerator.clip_grad_norm_ = recording_clip
    _take_step(parts, _batch(parts, 2), 0)
    assert clipped == [("generator", 0.5), ("critics", 0.25)]


# ------------------------------------------------------------------------------ non-finite losses


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_naming_the_steps(prepared, tmp_path):
    parts = build_training(_config(prepared, tmp_path, "training.max_nonfinite_steps=3"), Accelerator(cpu=True))
    model = parts.accelerator.unwrap_model(parts.model)
    poisoned_calls = {1, 2, 5, 6, 7}  # optimizer steps (0-based) whose reconstruction is NaN
    calls = iter(range(100))
    model.decoder.register_forward_hook(lambda m, i, o: o * float("nan") if next(calls) in poisoned_calls else o)
    x = _batch(parts, 2)
    window = MetricWindow()
    history = []
    for step in range(5):
        window.add(_take_step(parts, x, step), 2)
        history.append(_params(model))
    for name in history[0]:
        assert torch.equal(history[0][name], history[1][name]) and torch.equal(history[1][name], history[2][name])
    assert any(not torch.equal(history[2][n], history[3][n]) for n in history[0]), "a finite step moved nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state_step = next(iter(parts.opt_g.optimizer.state.values()))["step"]
    assert int(state_step) == 3, "skipped steps must not advance AdamW's bias correction"
    assert parts.guard.check() == 2
    row = window.row(parts.accelerator)
    assert np.isfinite(row["loss"]) and np.isfinite(row["l1"])
    for step in range(5, 8):
        _take_step(parts, x, step)
    with pytest.raises(NonFiniteLossError, match=r"steps 6 to 8: 3 non-finite steps in a row.*l1=nan"):
        parts.guard.check()


# ------------------------------------------------------------------------------ host syncs

_SYNC_METHODS = ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__")


def _record_host_syncs(monkeypatch) -> list[str]:
    """Patch the Tensor methods that wait for the device; each call records the calling line."""
    calls: list[str] = []
    for name in _SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def recording(self, *args, __original=original, __name=name, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]  # the caller
            calls.append(f"{__name} at {frame.filename}:{frame.lineno}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    return calls


def _steps_between_logs(prepared, tmp_path, monkeypatch) -> list[str]:
    config = _config(
        prepared, tmp_path, "gan.start_step=1", "gan.image_gan_weight=1.0", "gan.volume_gan_weight=0.5",
        "training.log_every=100", "training.validate_every=100", "training.checkpoint_every=100",
    )  # fmt: skip
    parts = build_training(config, Accelerator(cpu=True))
    metrics = MetricsLogger(parts.accelerator, tmp_path / "metrics.csv")
    window = MetricWindow()
    batches = iter(parts.loader)
    for step in range(2):  # codebook initialisation and the GAN stage's first step happen here
        window.add(_take_step(parts, model_input(parts, next(batches)), step), 2)
    calls = _record_host_syncs(monkeypatch)
    for step in range(2, 4):
        window.add(_take_step(parts, model_input(parts, next(batches)), step), 2)
        on_sync(parts, window, metrics, 0, last_step=100)
    monkeypatch.undo()
    return calls


def test_a_training_step_makes_no_host_sync_between_log_steps(prepared, tmp_path, monkeypatch):
    calls = _steps_between_logs(prepared, tmp_path, monkeypatch)
    assert calls == [], f"host syncs in the training step: {calls}"


def test_the_critics_slices_are_drawn_by_a_generator_on_the_step_s_device(prepared, tmp_path, monkeypatch):
    """A CPU generator on a GPU run drew the 2D critic's slice indices on the host and copied
    them to the GPU, a host synchronisation every step. ``torch.Generator`` is wrapped to record
    the device each generator is asked for (only a CPU exists here, so this checks the request);
    the slices stay reproducible: the same micro-batch number draws the same slices."""
    config = _config(prepared, tmp_path, "gan.start_step=0", "gan.image_gan_weight=1.0", "gan.volume_gan_weight=0")
    parts = build_training(config, Accelerator(cpu=True))
    asked: list[object] = []
    real_generator = torch.Generator

    def recording_generator(device=None):
        asked.append(device)
        return real_generator(device="cpu")

    monkeypatch.setattr(torch, "Generator", recording_generator)
    drawn: list[torch.Tensor] = []

    def recording_slices(*volumes, **kwargs):
        slices = losses.random_slices(*volumes, **kwargs)
        drawn.append(slices[0])  # the real volume's slices
        return slices

    monkeypatch.setattr(steps, "random_slices", recording_slices)
    x = _batch(parts, 2)
    train_micro_batch(parts, x, 7)
    train_micro_batch(parts, x, 7)
    train_micro_batch(parts, x, 8)
    assert asked == [x.device] * 3
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


# ------------------------------------------------------------------------------ data order


def _volume_order(parts, epoch: int, skip: int = 0) -> list[int]:
    parts.loader.set_epoch(epoch)
    parts.dataset.set_epoch(epoch)
    loader = parts.accelerator.skip_first_batches(parts.loader, skip) if skip else parts.loader
    return [int(v) for batch in loader for v in batch["volume_index"]]


def test_volumes_are_shuffled_per_epoch_seeded_and_resumable(prepared, tmp_path):
    config = _config(prepared, tmp_path, "dataset.patches_per_volume=4", "training.batch_size=2")
    first = build_training(config, Accelerator(cpu=True))
    epochs = [_volume_order(first, epoch) for epoch in range(3)]
    assert len(epochs[0]) == 16 and sorted(epochs[0]) == sorted([v for v in range(4) for _ in range(4)])
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [i % 4 for i in range(16)], "not shuffled"
    AcceleratorState._reset_state(reset_partial_state=True)
    second = build_training(config, Accelerator(cpu=True))
    assert [_volume_order(second, epoch) for epoch in range(3)] == epochs
    assert _volume_order(second, 1, skip=3) == epochs[1][6:]  # a run resumed 3 batches into epoch 1
    other = build_training(load_config(DEMO, [*_as_overrides(config), "training.seed=1"]), Accelerator(cpu=True))
    assert _volume_order(other, 0) != epochs[0]


def _as_overrides(config) -> list[str]:
    return [f"dataset.path={config.dataset.path}", "dataset.patch_size=[16,32,32]", "dataset.patches_per_volume=4",
            f"training.output_dir={config.training.output_dir}"]  # fmt: skip


# ------------------------------------------------------------------------------ configuration


def test_process_group_timeout_and_keep_checkpoints_come_from_the_recipe(tmp_path):
    config = load_config(DEMO, ["training.ddp_timeout_minutes=90", f"training.output_dir={tmp_path}"])
    accelerator = build_accelerator(config)
    assert accelerator.init_handler.timeout.total_seconds() == 90 * 60
    with pytest.raises(ValueError, match="training.keep_checkpoints must be >= 1, got 0"):
        load_config(DEMO, ["training.keep_checkpoints=0"])
    assert load_config(DEMO).training.val_max_volumes == 4


def test_compile_asks_accelerate_for_inductor(tmp_path):
    assert build_accelerator(load_config(DEMO, [f"training.output_dir={tmp_path}"])).state.dynamo_plugin.backend.value == "NO"
    AcceleratorState._reset_state(reset_partial_state=True)
    config = load_config(DEMO, ["training.compile=true", f"training.output_dir={tmp_path}"])
    assert build_accelerator(config).state.dynamo_plugin.backend.value == "INDUCTOR"


def test_tf32_on_cuda_by_default_and_deterministic_on_request():
    config = load_config(DEMO)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        configure_backends(config.training, torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        configure_backends(config.training, torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled()
        config.training.deterministic = True
        configure_backends(config.training, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cudnn_benchmark_on_cuda_by_default_off_on_request_or_when_deterministic():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backends(load_config(DEMO).training, torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False  # the CPU run leaves cuDNN alone
        configure_backends(load_config(DEMO).training, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is True
        configure_backends(load_config(DEMO, ["training.cudnn_benchmark=false"]).training, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
        torch.backends.cudnn.benchmark = True
        configure_backends(load_config(DEMO, ["training.deterministic=true"]).training, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = saved


def test_validation_and_the_best_export_leave_the_model_training(prepared, tmp_path):
    config = _config(prepared, tmp_path, "training.val_patch_size=[16,32,32]", "training.validate_every=1")
    parts = build_training(config, Accelerator(cpu=True))
    parts.output_dir.mkdir(parents=True)
    _take_step(parts, _batch(parts, 2), 0)
    on_sync(parts, MetricWindow(), MetricsLogger(parts.accelerator, tmp_path / "metrics.csv"), 0, last_step=100)
    assert (parts.output_dir / "best" / "model_index.json").is_file()
    assert parts.model.training and parts.model.quantizer.training


def test_validation_logs_evaluate_s_body_and_region_figures(prepared, tmp_path):
    config = _config(prepared, tmp_path, "training.validate_every=1")
    parts = build_training(config, Accelerator(cpu=True))
    parts.output_dir.mkdir(parents=True)
    _take_step(parts, _batch(parts, 2), 0)
    on_sync(parts, MetricWindow(), MetricsLogger(parts.accelerator, tmp_path / "metrics.csv"), 0, last_step=100)
    with (tmp_path / "metrics.csv").open() as f:
        row = [r for r in csv.DictReader(f) if r["val_psnr"]][-1]
    # The phantoms hold lung, soft tissue, contrast and bone, and air outside the body.
    for key in ("val_body_psnr", "val_body_ssim", "val_mae_body", "val_mae_lung", "val_mae_soft_tissue", "val_mae_bone"):
        assert np.isfinite(float(row[key])), key
    assert float(row["val_body_psnr"]) != float(row["val_psnr"]), "body PSNR must not be the whole-volume figure"


def test_validation_plans_its_grid_as_the_pipeline_does_unless_given_a_budget(prepared, tmp_path, monkeypatch):
    """Validation scores what users get: the pipeline's own planned grid (no budget passed), not one cut
    to the training patch (which cost 0.35 dB on phantoms and 3.4 dB on a real CT, BENCHMARKS.md)."""
    from ctpa_vq.training import validation

    budgets = []

    def recording(*args, **kwargs):
        budgets.append(kwargs["max_patch_voxels"])
        return score_volume(*args, **kwargs)

    score_volume = validation.score_volume
    monkeypatch.setattr(validation, "score_volume", recording)
    for overrides, expected in (((), None), (("training.val_max_patch_voxels=16000",), 16000)):
        budgets.clear()
        out = tmp_path / str(expected)
        parts = build_training(_config(prepared, out, "training.validate_every=1", *overrides), Accelerator(cpu=True))
        parts.output_dir.mkdir(parents=True)
        _take_step(parts, _batch(parts, 2), 0)
        on_sync(parts, MetricWindow(), MetricsLogger(parts.accelerator, out / "metrics.csv"), 0, last_step=100)
        assert budgets and set(budgets) == {expected}, budgets
