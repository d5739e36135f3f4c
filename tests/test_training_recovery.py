"""Crash recovery by crashing (SIGKILL, also inside a checkpoint write) and validation shared
across 2 real processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ctpa_vq.data.phantom import write_phantom_dir
from ctpa_vq.data.prepare import prepare_dataset

from test_training import DEMO, DUMP_SCRIPT, ROOT, SMALL, _assert_same_state, _free_port, _metric_steps, _rows, _run

VALIDATE_SCRIPT = ROOT / "tests" / "scripts" / "validate_sharded.py"
RECOVERY = ["training.max_steps=8", "training.checkpoint_every=2", "training.validate_every=4"]


def _start(out: Path, *overrides: str, resume: str | None = None, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(DUMP_SCRIPT), "--config", str(DEMO), *SMALL, *RECOVERY, f"training.output_dir={out}"]
    cmd += [*overrides, *(["--resume", resume] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_checkpoint_then_resume_to_the_same_parameters(tmp_path):
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    _run(uninterrupted, 1, *RECOVERY)

    # 1. Killed inside the save of step 4: its files are written, the rename has not happened.
    proc = _start(crashed, env={"CTPA_VQ_TEST_SLEEP_IN_SAVE": "600@4"})
    partial = crashed / "checkpoints" / ".partial-step-00000004"
    _kill_when(proc, lambda: (partial / "model.safetensors").is_file() and (partial / "random_states_0.pkl").is_file())
    assert [p.name for p in (crashed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert max(_metric_steps(crashed)) == 4  # rows 3 and 4 were written after the last checkpoint

    # 2. Resumed (from step 2), then killed between checkpoints, after logging step 5.
    proc = _start(crashed, resume="latest")
    _kill_when(proc, lambda: (crashed / "checkpoints" / "step-00000004").is_dir() and 5 in _metric_steps(crashed))

    # 3. Resumed again, to the end.
    _run(crashed, 1, *RECOVERY, resume="latest")
    _assert_same_state(load_file(uninterrupted / "replica-0.safetensors"), load_file(crashed / "replica-0.safetensors"))
    assert _metric_steps(crashed) == list(range(1, 9))  # each step once
    keys = ("step", "lr", "d_lr", "samples_seen", "epoch", "loss")
    assert [[r[k] for k in keys] for r in _rows(crashed)] == [[r[k] for k in keys] for r in _rows(uninterrupted)]
    assert not any(p.name.startswith(".partial") for p in (crashed / "checkpoints").iterdir())

    # 4. Branching off from an older checkpoint never deletes it (keep_checkpoints=1 alone would).
    older = crashed / "checkpoints" / "step-00000006"
    assert older.is_dir()
    _run(crashed, 1, *RECOVERY, "training.keep_checkpoints=1", resume=str(older))
    assert [p.name for p in (crashed / "checkpoints").iterdir()] == ["step-00000006", "step-00000008"]


@pytest.mark.slow
def test_validation_is_shared_across_processes_and_matches_one_process(tmp_path):
    write_phantom_dir(tmp_path / "raw", 5, (24, 48, 48), seed=0)
    prepare_dataset(tmp_path / "raw", tmp_path / "prepared", 0.39, None, seed=0)  # the hash split: 3 validation
    overrides = ["training.val_patch_size=[16,32,32]", "training.val_max_volumes=null", "training.val_batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one" / "metrics.json", tmp_path / "two" / "metrics.json"
    for path in (one, two):
        path.parent.mkdir()
    subprocess.run(
        [sys.executable, str(VALIDATE_SCRIPT), str(tmp_path / "prepared"), str(one), *overrides],
        check=True, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    proc = subprocess.run(
        [*launch, str(VALIDATE_SCRIPT), str(tmp_path / "prepared"), str(two), *overrides],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    assert single.pop("processes") == 1 and sharded.pop("processes") == 2
    assert single["volumes"] == 3, "the test needs more validation volumes than processes"
    assert sharded == pytest.approx(single, rel=1e-12, abs=1e-12)
    assert (tmp_path / "two" / "samples" / "step-00000000.png").is_file()
    shares = [json.loads((tmp_path / "two" / f"scored-{rank}.json").read_text()) for rank in range(2)]
    assert [len(share) for share in shares] == [2, 1] and sorted(shares[0] + shares[1]) == sorted(
        json.loads((tmp_path / "one" / "scored-0.json").read_text())
    )
