"""`ctpa-vq verify`: predicted GPU memory against a card, and multi-node Accelerate configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctpa_vq.cli import main
from ctpa_vq.training.verify import FAIL, PASS, accelerate_config_checks

ROOT = Path(__file__).resolve().parents[1]


def _accelerate_yaml(tmp_path: Path, **settings) -> Path:
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_machines": 1,
              "num_processes": 1, "mixed_precision": "bf16", "use_cpu": False, **settings}
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _memory_line(out: str) -> str:
    return next(line for line in out.splitlines() if "GPU memory:" in line)


def test_verify_says_a_recipe_does_not_fit_and_names_the_knobs(tmp_path, capsys):
    accelerate = _accelerate_yaml(tmp_path)
    assert main(["verify", "--accelerate-config", str(accelerate), "--gpu-memory", "0.5",
                 "dataset.patch_size=[16,32,32]"]) == 1
    line = _memory_line(capsys.readouterr().out)
    assert line.startswith(f"[{FAIL}]") and "does not fit --gpu-memory 0.5 GiB" in line
    assert "model.gradient_checkpointing=true ->" in line
    assert "training.batch_size=1 training.gradient_accumulation_steps=2 ->" in line  # demo batch is 2
    assert "dataset.patch_size=[8,32,32] ->" in line


def test_verify_passes_a_recipe_that_fits(tmp_path, capsys):
    accelerate = _accelerate_yaml(tmp_path)
    main(["verify", "--accelerate-config", str(accelerate), "--gpu-memory", "80", "dataset.patch_size=[16,32,32]"])
    line = _memory_line(capsys.readouterr().out)
    assert line.startswith(f"[{PASS}]") and "fits --gpu-memory 80 GiB" in line and "bf16 autocast" in line


@pytest.mark.parametrize(
    "settings, status, words",
    [
        (dict(num_machines=2, num_processes=8, main_process_ip="10.1.2.3"), PASS, "10.1.2.3:29500"),
        (dict(num_machines=2, num_processes=7, main_process_ip="10.1.2.3"), FAIL, "not num_machines 2 x GPUs per node"),
        (dict(num_machines=2, num_processes=8, main_process_ip="192.0.2.1"), FAIL, "documentation placeholder"),
        (dict(num_machines=2, num_processes=8, main_process_ip="node0.example.com"), FAIL, "documentation placeholder"),
        (dict(num_machines=2, num_processes=8, main_process_ip="127.0.0.1"), FAIL, "loopback"),
        (dict(num_machines=2, num_processes=8), FAIL, "no main_process_ip"),
    ],
)
def test_multi_node_configs_are_checked(tmp_path, settings, status, words):
    path = _accelerate_yaml(tmp_path, distributed_type="MULTI_GPU", main_process_port=29500, **settings)
    _, checks = accelerate_config_checks(path)
    relevant = [c for c in checks if c.name in ("processes per node", "rendezvous") and c.status == status]
    assert any(words in c.detail for c in relevant), [str(c) for c in checks]


def test_the_shipped_multinode_config_is_flagged_until_its_address_is_set():
    _, checks = accelerate_config_checks(ROOT / "accelerate_configs" / "multinode.yaml")
    assert [c.status for c in checks if c.name == "rendezvous"] == [FAIL]
