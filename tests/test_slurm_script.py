"""The SLURM batch script, run by bash with SLURM's commands standing in (no cluster here):
the Accelerate config it writes passes `verify`, and the launch parses as `accelerate launch`."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import yaml
from accelerate.commands.launch import launch_command_parser

from ctpa_vq.training.verify import FAIL, accelerate_config_checks

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm" / "train_multinode.sbatch"


def _command(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_batch_script_launches_one_accelerate_per_node_at_the_head_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _command(bin_dir, "scontrol", 'printf "10.0.0.5\\n10.0.0.6\\n"')  # `scontrol show hostnames`
    _command(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args')
    _command(bin_dir, "ctpa-vq", f'printf "%s\\n" "$@" > {tmp_path}/verify.args')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[5-6]", "OUTPUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(SCRIPT), "configs/ctpa_512.yaml", "dataset.path=/shared/data"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    config_path = tmp_path / "out" / "accelerate_42.yaml"
    config = yaml.safe_load(config_path.read_text())
    assert (config["num_machines"], config["num_processes"], config["main_process_ip"]) == (2, 8, "10.0.0.5")
    assert config["rdzv_backend"] == "c10d" and config["mixed_precision"] == "bf16"
    _, checks = accelerate_config_checks(config_path)
    assert not [c for c in checks if c.status == FAIL and c.name != "GPUs per node"], [str(c) for c in checks]

    verify = (tmp_path / "verify.args").read_text().split("\n")
    assert verify[:5] == ["verify", "--config", "configs/ctpa_512.yaml", "--accelerate-config", str(config_path)]
    srun = (tmp_path / "srun.args").read_text().split()
    assert srun[:2] == ["accelerate", "launch"]
    launch = launch_command_parser().parse_args(srun[2:])
    assert (launch.num_processes, launch.num_machines, launch.rdzv_backend) == (8, 2, "c10d")
    assert launch.main_process_ip == "10.0.0.5" and launch.training_script == "train_vqgan.py"
    assert shlex.join(launch.training_script_args) == (
        f"--config configs/ctpa_512.yaml --resume latest dataset.path=/shared/data "
        f"training.output_dir={tmp_path / 'out'}"
    )


def test_a_long_node_list_does_not_kill_the_script_with_sigpipe(tmp_path):
    """`set -o pipefail` plus `scontrol ... | head -n 1` died of SIGPIPE (exit 141) whenever `scontrol`
    was still writing when `head` had left: sometimes with two nodes, always with a long list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _command(bin_dir, "scontrol", 'printf "10.0.0.5\\n"; for i in $(seq 20000); do echo "node$i"; done')
    _command(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args')
    _command(bin_dir, "ctpa-vq", "true")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-20000]", "OUTPUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(SCRIPT), "configs/ctpa_512.yaml"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    config = yaml.safe_load((tmp_path / "out" / "accelerate_7.yaml").read_text())
    assert config["main_process_ip"] == "10.0.0.5"
