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
