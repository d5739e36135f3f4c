"""`benchmarks/gpu_suite.py --smoke`: the GPU suite's code paths, end to end on the CPU (tiny preset).

The figures themselves are not checked (CPU wall times mean nothing for a GPU): that every figure
is there, measured where a CPU can measure it, and that the Markdown table is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("reconstruction_stage", "gan_stage")


@pytest.mark.slow
def test_smoke_mode_writes_every_figure_as_json_and_markdown(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["errors"] == {}

    for stage in STAGES:  # CUDA memory cannot be measured on a CPU; the prediction is there
        memory = result["training_memory"][stage]
        assert memory["predicted_allocated_gib"] > 0 and memory["predicted_per_process_gib"] > 0
        assert memory["measured_allocated_gib"] is None and memory["measured_over_predicted"] is None
    assert result["training_memory"]["gan_stage"]["predicted_allocated_gib"] > result["training_memory"][
        "reconstruction_stage"]["predicted_allocated_gib"]  # the critics and their optimizer  # fmt: skip
    assert set(result["step_time"]) == {"eager", "tf32_off", "cudnn_benchmark_off"}
    for variant in result["step_time"].values():
        for stage in STAGES:
            assert variant[stage]["seconds_per_step"] > 0 and variant[stage]["patches_per_s"] > 0
    assert "compile" in result["skipped"]

    validation = result["validation"]
    assert validation["val_batch_size"] == 2 and validation["volume"] == [32, 48, 48]
    assert validation["predicted_allocated_gib"] > 0 and validation["seconds"] > 0

    reconstruction = result["reconstruction"]
    # the training patch the recipe stores, 25% overlap: strides 12 x 24 x 24 over 32 x 48 x 48 (by hand)
    assert reconstruction["grid"].startswith("3 x 2 x 2 = 12 patches of 16 x 32 x 32 voxels")
    assert set(reconstruction["by_batch_size"]) == {"1", "2"}
    assert all(figures["seconds"] > 0 for figures in reconstruction["by_batch_size"].values())
    scoring = reconstruction["scoring"]
    assert scoring["scoring_s"] == pytest.approx(scoring["region_labels_s"] + scoring["metrics_s"], abs=2e-3)
    assert scoring["scoring_over_reconstruction"] > 0 and -1 <= scoring["ssim"] <= 1  # an untrained model
    assert result["encode"]["volumes"] == 2 and result["encode"]["volumes_per_s"] > 0

    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.startswith("| figure | value |\n|---|---|\n")
    for label in ("training peak, reconstruction stage", "training peak, gan stage", "step, eager, gan stage",
                  "step, tf32 off", "step, cudnn benchmark off", "validation peak", "reconstruction 32x48x48",
                  "scoring / reconstruction", "encode, 32x48x48", "compile | skipped"):
        assert label in table, label
