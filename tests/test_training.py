"""The training loop: real `accelerate launch` runs, kill-and-resume, world-size changes, learning."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ctpa_vq import VQGAN3D
from ctpa_vq.cli import main
from ctpa_vq.data.patch_dataset import VolumeStore
from ctpa_vq.evaluation.metrics import psnr_hu
from ctpa_vq.pipelines import CTPAReconstructionPipeline
from ctpa_vq.training import load_config
from ctpa_vq.training.checkpoints import resolve_checkpoint
from ctpa_vq.training.loop import TrainResult
from ctpa_vq.training.schedules import lr_factor
from ctpa_vq.training.summary import run_summary

ROOT = Path(__file__).resolve().parents[1]
DUMP_SCRIPT = ROOT / "tests" / "scripts" / "train_and_dump.py"
DEMO = ROOT / "configs" / "demo.yaml"

# Small and fast, but every part on: EMA codebook, both critics from step 2, checkpoints, validation.
SMALL = [
    "dataset.phantoms=5",
    "dataset.phantom_shape=[24,48,48]",
    "dataset.patch_size=[16,32,32]",
    "dataset.patches_per_volume=2",
    "optimizer.warmup_steps=2",
    "gan.start_step=2",
    "gan.image_gan_weight=1.0",
    "gan.volume_gan_weight=0.5",
    "gan.base_channels=8",
    "gan.n_layers=2",
    "training.batch_size=2",
    "training.max_steps=6",
    "training.checkpoint_every=3",
    "training.validate_every=3",
    "training.log_every=1",
    "training.val_patch_size=[16,32,32]",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    out: Path, processes: int, *overrides: str, resume: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Train via the dump script: plain python for 1 process, `accelerate launch` (gloo) for 2."""
    script = [str(DUMP_SCRIPT), "--config", str(DEMO), *SMALL, f"training.output_dir={out}", *overrides]
    script += ["--resume", resume] if resume else []
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()),
            *script,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metric_steps(out: Path) -> list[int]:
    with (out / "metrics.csv").open() as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row["loss"]]


def _rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as f:
        return [row for row in csv.DictReader(f) if row["loss"]]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_process_launch_keeps_replicas_identical(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, 2)
    replicas = [load_file(out / f"replica-{rank}.safetensors") for rank in range(2)]
    _assert_same_state(*replicas)
    assert bool(replicas[0]["quantizer.initialized"])
    assert _metric_steps(out) == [1, 2, 3, 4, 5, 6]  # one writer: each step once
    # The run's own file, plus the copies exported with best/ and final/: nothing per rank.
    assert set(tmp_path.rglob("metrics.csv")) == {out / "metrics.csv", out / "best" / "metrics.csv", out / "final" / "metrics.csv"}
    checkpoint = out / "checkpoints" / "step-00000006"
    for name in ("model.safetensors", "model_1.safetensors", "random_states_0.pkl", "random_states_1.pkl"):
        assert (checkpoint / name).is_file(), name
    assert (out / "final" / "model_index.json").is_file()
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_skips_the_step_on_both(tmp_path):
    out = tmp_path / "run"
    # Process 1's reconstruction is NaN at steps 3 and 4 (forward calls 2, 3); validation is off.
    _run(out, 2, "training.validate_every=100", env={"CTPA_VQ_TEST_NAN": "1:2,3"})
    _assert_same_state(*(load_file(out / f"replica-{rank}.safetensors") for rank in range(2)))
    with (out / "metrics.csv").open() as f:
        skipped = {int(r["step"]): int(r["skipped_steps"]) for r in csv.DictReader(f) if r["loss"]}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2}


@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_parameters(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    _run(uninterrupted, 1)
    _run(interrupted, 1, "training.stop_at_step=3")
    assert not (interrupted / "final").exists()
    _run(interrupted, 1, resume="latest")
    _assert_same_state(
        load_file(uninterrupted / "replica-0.safetensors"), load_file(interrupted / "replica-0.safetensors")
    )
    assert _metric_steps(interrupted) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_discriminator_is_not_updated_before_its_start(tmp_path):
    out = tmp_path / "run"
    _run(out, 1, "gan.start_step=4", "training.max_steps=3", "training.checkpoint_every=3")
    before = torch.load(out / "checkpoints" / "step-00000003" / "optimizer_1.bin", weights_only=True)
    assert before["state"] == {}, "the critics' optimizer stepped before gan.start_step"
    generator = torch.load(out / "checkpoints" / "step-00000003" / "optimizer.bin", weights_only=True)
    assert generator["state"], "the generator's optimizer never stepped"


@pytest.mark.slow
def test_resume_on_another_world_size_and_back(tmp_path):
    uninterrupted, out = tmp_path / "uninterrupted", tmp_path / "run"
    _run(uninterrupted, 1, "training.checkpoint_every=1")
    _run(out, 1, "training.stop_at_step=2", "training.checkpoint_every=1")
    # Two processes of batch 1 take the same global batches as one process of batch 2.
    proc = _run(out, 2, "training.stop_at_step=4", "training.checkpoint_every=1", "training.batch_size=1", resume="latest")
    assert "resuming a 1-process checkpoint on 2 processes" in proc.stdout + proc.stderr
    _assert_same_state(*(load_file(out / f"replica-{r}.safetensors") for r in range(2)))
    _run(out, 1, "training.checkpoint_every=1", resume="latest")
    assert _metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert (out / "final" / "vqgan" / "diffusion_pytorch_model.safetensors").is_file()
    # The schedules and the data position at every step are those of the uninterrupted run.
    keys = ("step", "lr", "d_lr", "samples_seen", "epoch")
    assert [[r[k] for k in keys] for r in _rows(out)] == [[r[k] for k in keys] for r in _rows(uninterrupted)]


@pytest.mark.slow
def test_demo_recipe_learns(tmp_path):
    out = tmp_path / "demo"
    steps = ["training.max_steps=120", "training.validate_every=120", "training.checkpoint_every=120"]
    subprocess.run(
        [sys.executable, str(ROOT / "train_vqgan.py"), f"training.output_dir={out}", *steps],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    val = VolumeStore.from_disk(out / "phantom_dataset", "validation")
    trained = CTPAReconstructionPipeline.from_pretrained(out / "final")
    torch.manual_seed(0)
    untrained = CTPAReconstructionPipeline(VQGAN3D.from_preset("tiny").eval())

    def mean_psnr(pipeline) -> float:
        pipeline.set_progress_bar_config(disable=True)
        scores = []
        for i in range(len(val)):
            hu = np.asarray(val.volume(i))
            # the pipeline's own planned grid, as validation plans it
            scores.append(psnr_hu(pipeline(hu).reconstruction, hu))
        return float(np.mean(scores))

    before, after = mean_psnr(untrained), mean_psnr(trained)
    assert after > before + 8.0, f"PSNR {before:.1f} dB untrained -> {after:.1f} dB after 120 steps"
    assert (out / "samples" / "step-00000120.png").is_file()
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["val_psnr"]]
    assert float(rows[-1]["val_psnr"]) == pytest.approx(after, abs=0.5)


@pytest.mark.slow
def test_demo_ends_with_a_summary_of_its_model(tmp_path, capsys):
    """The demo script, shrunk to two steps: its last lines are the last validation's figures as
    metrics.csv has them, the model, the mid-slice picture, and commands that run on that model."""
    out = tmp_path / "demo"
    small = ["dataset.phantoms=3", "dataset.phantom_shape=[24,48,48]", "dataset.patch_size=[16,32,32]",
             "dataset.patches_per_volume=2", "training.max_steps=2", "training.validate_every=2", "training.log_every=1"]
    demo = subprocess.run(
        [sys.executable, str(ROOT / "train_vqgan.py"), f"training.output_dir={out}", *small],
        check=True, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    with (out / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["val_psnr"]]
    assert int(rows[-1]["step"]) == 2
    summary = demo.stdout[demo.stdout.index("Training done: step 2 of 2"):]
    figures = re.search(r"whole volume PSNR (\S+) dB, SSIM (\S+); body PSNR (\S+) dB, SSIM (\S+) ", summary).groups()
    for printed, column, digits in zip(figures, ("val_psnr", "val_ssim", "val_body_psnr", "val_body_ssim"), (2, 4, 2, 4)):
        assert float(printed) == pytest.approx(float(rows[-1][column]), abs=0.6 * 10**-digits), column
    assert re.search(r"model +(\S+)", summary)[1] == str(out / "final") and (out / "final" / "model_index.json").is_file()
    picture = re.search(r"picture +(\S+)", summary)[1]
    assert picture == str(out / "samples" / "step-00000002.png") and Path(picture).is_file()
    reconstruct = next(line.split() for line in summary.splitlines() if "ctpa-vq reconstruct" in line)
    assert main(reconstruct[1:] + ["--no-progress"]) == 0, capsys.readouterr().err  # the command it suggests runs
    assert (out / "reconstruction.nii.gz").is_file() and (out / "reconstruction.png").is_file()
    assert any(line.split()[:2] == ["ctpa-vq", "evaluate"] for line in summary.splitlines())


# ---------------------------------------------------------------------------------------- fast


def test_summary_of_a_run_on_a_prepared_dataset_and_of_one_stopped_early(tmp_path):
    config = load_config(DEMO, [f"training.output_dir={tmp_path}", f"dataset.path={tmp_path / 'prepared'}"])
    model = VQGAN3D.from_preset("tiny")
    figures = {"val_psnr": 31.234, "val_ssim": 0.91234, "val_body_psnr": 28.5, "val_body_ssim": 0.8}
    done = run_summary(config, TrainResult(model, 300, tmp_path / "final", figures, tmp_path / "step.png"))
    assert "whole volume PSNR 31.23 dB, SSIM 0.9123; body PSNR 28.50 dB, SSIM 0.8000" in done
    assert "--input YOUR_CT.nii.gz" in done  # no phantom to point at
    assert f"ctpa-vq evaluate --model {tmp_path / 'final'} --input {tmp_path / 'prepared'} --split validation" in done

    stopped = run_summary(config, TrainResult(model, 40, None))
    assert stopped.startswith("Training stopped early: step 40 of 300") and "--resume latest" in stopped
    assert "validation  none in this run" in stopped and "ctpa-vq" not in stopped


def test_latest_ignores_half_written_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000010").mkdir(parents=True)
    (root / "step-00000010" / "model.safetensors").write_bytes(b"x")
    (root / ".partial-step-00000020").mkdir()  # a save killed before its rename
    assert resolve_checkpoint(root, "latest") == root / "step-00000010"
    assert resolve_checkpoint(tmp_path / "none", "latest") is None
    assert resolve_checkpoint(root, None) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(root, str(root / ".partial-step-00000020"))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=10, total=100, floor=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_config_overrides_are_typed_and_checked(tmp_path):
    config = load_config(DEMO, ["optimizer.lr=1e-4", "dataset.max_patients=null", "dataset.patch_size=[8,16,16]"])
    assert config.optimizer.lr == 1e-4 and config.dataset.max_patients is None
    assert config.dataset.patch_size == (8, 16, 16)
    with pytest.raises(Exception, match="lrr"):
        load_config(DEMO, ["optimizer.lrr=1"])
    with pytest.raises(Exception, match="optimizer.lr"):
        load_config(DEMO, ["optimizer.lr=fast"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_renamed_recipe_keys_are_errors_naming_the_new_key(tmp_path):
    """A recipe written before the renames (e.g. the config.yaml of an older run) fails before training."""
    old_run = tmp_path / "config.yaml"
    old_run.write_text("gan:\n  video_gan_weight: 0.5\n  channels: 8\n")
    with pytest.raises(ValueError, match=r"config.yaml: .*gan.video_gan_weight is now gan.volume_gan_weight.*"
                                         r"gan.channels is now gan.base_channels"):
        load_config(old_run)
    with pytest.raises(ValueError, match=r"overrides: .*gan.layers is now gan.n_layers"):
        load_config(DEMO, ["gan.layers=2"])
    # Optimizer settings left `model` and `gan` for two `OptimizerConfig` sections.
    with pytest.raises(ValueError, match=r"model.lr is now optimizer.lr; "
                                         r"gan.warmup_steps is now critic_optimizer.warmup_steps"):
        load_config(DEMO, ["model.lr=1e-4", "gan.warmup_steps=10"])
    with pytest.raises(ValueError, match=r"model.grad_clip is now optimizer.grad_clip"):
        load_config(DEMO, ["model.grad_clip=0"])
    renamed = load_config(DEMO, ["gan.volume_gan_weight=0.5", "gan.base_channels=8", "gan.n_layers=2"])
    assert (renamed.gan.volume_gan_weight, renamed.gan.base_channels, renamed.gan.n_layers) == (0.5, 8, 2)
    moved = load_config(DEMO, ["optimizer.lr=1e-4", "critic_optimizer.warmup_steps=10"])
    assert (moved.optimizer.lr, moved.critic_optimizer.warmup_steps, moved.critic_optimizer.lr) == (1e-4, 10, 3e-4)


def test_recipes_parse():
    for recipe in (ROOT / "configs").glob("*.yaml"):
        load_config(recipe)
    big = load_config(ROOT / "configs" / "ctpa_512.yaml")
    assert big.model.preset == "ctpa-512" and big.dataset.patch_size == (128, 256, 256)


def test_verify_reports_failures_with_exit_code(tmp_path):
    from ctpa_vq.cli import main

    assert main(["verify", "--accelerate-config", str(ROOT / "accelerate_configs" / "cpu.yaml")]) == 0
    assert main(["verify", f"dataset.path={tmp_path / 'nothing'}"]) == 1
    assert main(["verify", "--accelerate-config", str(ROOT / "accelerate_configs" / "4gpu.yaml")]) == (
        0 if torch.cuda.device_count() >= 4 else 1
    )


def test_accelerate_configs_are_what_their_names_say():
    import yaml

    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert configs["4gpu"]["distributed_type"] == "MULTI_GPU" and configs["4gpu"]["num_processes"] == 4
    assert configs["4gpu"]["mixed_precision"] == "bf16"
    assert configs["multinode"]["num_machines"] == 2 and configs["multinode"]["num_processes"] == 8
    assert configs["cpu"]["num_processes"] == 2 and configs["cpu"]["mixed_precision"] == "no"
    assert configs["single_gpu"]["num_processes"] == 1
