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

from ctpa_vq.training.checkpoints import resolve_checkpoint
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
           "SLURM_JOB_NODELIST": "node[5-6]", "SLURM_CPUS_PER_TASK": "32", "OUTPUT": str(tmp_path / "out")}
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
    assert srun[:3] == ["--cpus-per-task=32", "accelerate", "launch"]
    launch = launch_command_parser().parse_args(srun[3:])
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
           "SLURM_JOB_NODELIST": "node[1-20000]", "SLURM_CPUS_PER_TASK": "32",
           "OUTPUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", str(SCRIPT), "configs/ctpa_512.yaml"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)
    config = yaml.safe_load((tmp_path / "out" / "accelerate_7.yaml").read_text())
    assert config["main_process_ip"] == "10.0.0.5"


def _submit(tmp_path: Path, job_id: str, **env_vars: str) -> tuple[list[str], dict[str, str]]:
    """Run the batch script as job `job_id` of the default job name, from `tmp_path` (the submit
    folder); return the training command's arguments and the environment `srun` saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _command(bin_dir, "scontrol", 'printf "10.0.0.5\\n"')
    _command(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path}/srun.args\n'
             f'printf "HF_HUB_OFFLINE=%s\\n" "${{HF_HUB_OFFLINE-<unset>}}" > {tmp_path}/srun.env')
    _command(bin_dir, "ctpa-vq", "true")
    env = {k: v for k, v in os.environ.items() if k not in ("OUTPUT", "HF_HUB_OFFLINE")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=job_id, SLURM_JOB_NAME="ctpa-vq",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[5-6]", SLURM_CPUS_PER_TASK="32", **env_vars)
    result = subprocess.run(["bash", str(SCRIPT), "configs/ctpa_512.yaml"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines())
    return (tmp_path / "srun.args").read_text().split("\n")[:-1], srun_env


def _training_args(srun_args: list[str]) -> tuple[str | None, Path]:
    """(`--resume` value, `training.output_dir`) of the `accelerate launch ... train_vqgan.py` command."""
    start = srun_args.index("accelerate")
    args = launch_command_parser().parse_args(srun_args[start + 2 :]).training_script_args
    resume = args[args.index("--resume") + 1] if "--resume" in args else None
    output = [a.split("=", 1)[1] for a in args if a.startswith("training.output_dir=")][-1]
    return resume, Path(output)


def test_a_resubmitted_job_resumes_from_the_first_jobs_checkpoint(tmp_path):
    """Each resubmission gets a new job id: the output folder must not depend on it, or
    `--resume latest` finds no checkpoint and training restarts from step 0."""
    resume, output = _training_args(_submit(tmp_path, "42")[0])
    first_checkpoint = tmp_path / output / "checkpoints" / "step-00001000"
    first_checkpoint.mkdir(parents=True)  # what the first job's training left behind
    resume, output = _training_args(_submit(tmp_path, "43")[0])
    assert resume == "latest"
    assert resolve_checkpoint(tmp_path / output / "checkpoints", resume) == first_checkpoint


def test_output_env_var_still_chooses_the_folder(tmp_path):
    _, output = _training_args(_submit(tmp_path, "42", OUTPUT=str(tmp_path / "mine"))[0])
    assert output == tmp_path / "mine"


def test_srun_is_given_the_jobs_cpus_per_task(tmp_path):
    """Slurm 22.05-23.02's `srun` does not inherit `--cpus-per-task` from the batch job: without it
    the data-loading workers of a node share one core."""
    srun_args, _ = _submit(tmp_path, "42")
    launcher = srun_args[: srun_args.index("accelerate")]
    assert "--cpus-per-task=32" in launcher or ("--cpus-per-task", "32") in zip(launcher, launcher[1:])


def test_the_hub_is_left_online_unless_the_user_says_otherwise(tmp_path):
    """`hub.*` pushes during training and `--resume hub:` need the Hub: the script must not force
    HF_HUB_OFFLINE; a user who sets it keeps it."""
    assert _submit(tmp_path, "42")[1]["HF_HUB_OFFLINE"] == "<unset>"
    assert _submit(tmp_path, "43", HF_HUB_OFFLINE="1")[1]["HF_HUB_OFFLINE"] == "1"
