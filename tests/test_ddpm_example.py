"""`examples/ddpm_on_latents.py` runs standalone on CPU and decodes samples of the right shape and HU range."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddpm_on_latents.py"


@pytest.mark.slow
def test_example_trains_samples_and_decodes_to_hu(tmp_path):
    output = tmp_path / "samples.npz"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # CPU, and no network
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output", str(output), "--num-samples", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "DDPM loss" in run.stdout
    assert "4 encoded volumes; training on the 4 with latent shape (8, 4, 8, 8)" in run.stdout  # from `encode`'s table

    saved = np.load(output)
    samples, (low, high) = saved["samples"], saved["hu_window"]
    assert samples.shape == (2, 16, 32, 32)  # (N, D, H, W): the phantom size, not the padded latent size
    assert np.isfinite(samples).all()
    assert (low, high) == (-1024, 2048)  # the demo model's window, the package default
    assert ((samples > low) & (samples < high)).mean() > 0.5  # decoded HU, not the window's clipped edges
    assert samples.std() > 0  # decoded volumes, not a constant
