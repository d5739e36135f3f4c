"""benchmarks/quality.py --smoke: every method trains, reconstructs and is tabled; a rerun resumes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


@pytest.fixture
def keep_thread_count():
    """`quality.main` sets the process's torch thread count (`--threads`): give it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # ~20 s on two idle cores
def test_smoke_run_tables_every_method_and_resumes(tmp_path, capsys, keep_thread_count):
    results = tmp_path / "results.jsonl"
    report = quality.main(["--smoke", "--results", str(results)])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    methods = ["tricubic", *quality.LEARNED]
    assert sorted(r["method"] for r in records) == sorted(methods)
    for record in records:  # every validation and test volume at both smoke settings, finite
        assert set(record["figures"]) == {"phantom2", "phantom3", "phantom4", "phantom5"}
        for per_setting in record["figures"].values():
            assert set(per_setting) == {"12x16x16", "planned"}
            assert all(math.isfinite(v) for f in per_setting.values() for v in f.values())
    test_table = report.split("test (")[1]
    for method in methods:
        assert f"| {method} |" in test_table
    capsys.readouterr()
    again = quality.main(["--smoke", "--results", str(results)])
    assert f"{len(methods)} of {len(methods)} runs already in" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == len(methods) and again == report
    # each learned model at its pipeline default: the training patch for VQGAN3D without GroupNorm
    assert "| vqgan3d-none | pipeline default: 12x16x16 |" in test_table
    assert "| vqgan3d-group | pipeline default: planned |" in test_table
    assert test_table.count("| tricubic |") == 1


def test_step_times_take_turns_and_give_each_method_its_ratio_to_vqvae(capsys, keep_thread_count):
    report = quality.main(["--smoke", "--time-steps", "2", "--methods", "tricubic", "vqgan3d-none", "monai-vqvae"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in report.splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", "vqgan3d-none", "monai-vqvae"}  # the classical method has no training step
    assert rows["monai-vqvae"][1].strip(" |") == "1.00"
    ms = {m: float(rows[m][0]) for m in ("vqgan3d-none", "monai-vqvae")}
    assert float(rows["vqgan3d-none"][1].strip(" |")) == pytest.approx(ms["vqgan3d-none"] / ms["monai-vqvae"], abs=0.01)
