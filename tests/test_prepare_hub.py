"""``ctpa-vq prepare --input hf://datasets/ORG/NAME/PATH`` against the loopback Hub (tests/hub_server.py):
a private dataset repo is listed and read through ``HfFileSystem`` with the token from the environment,
one patient at a time, and gives the rows a local run of the same files gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
from huggingface_hub import HfApi

from ctpa_vq.data.phantom import write_phantom_nifti
from ctpa_vq.data.prepare import prepare_dataset

from dicom_series import write_series
from test_hub import TOKEN, _client_env, hub, no_xet  # noqa: F401  (fixtures: the loopback Hub, LFS not Xet)

SHAPE = (10, 16, 18)


def _rows(path: Path) -> dict[str, list[dict]]:
    loaded = datasets.load_from_disk(str(path))
    return {split: loaded[split].to_list() for split in loaded}


def test_prepare_reads_a_private_hub_dataset_patient_by_patient(hub, tmp_path):
    local = tmp_path / "collection"
    write_phantom_nifti(local / "ct" / "p1.nii.gz", SHAPE, seed=1)
    write_phantom_nifti(local / "ct" / "p2" / "scan_a.nii.gz", SHAPE, seed=2)
    write_phantom_nifti(local / "ct" / "p2" / "scan_b.nii.gz", SHAPE, seed=3)
    write_series(local / "ct" / "p3" / "series", (np.arange(6 * 12 * 14).reshape(6, 12, 14) % 900).astype(np.int16))
    (local / "README.md").write_text("a collection\n")
    api = HfApi(endpoint=hub, token=TOKEN)
    api.create_repo("lab/ctpa", repo_type="dataset", private=True)
    api.upload_folder(folder_path=str(local), repo_id="lab/ctpa", repo_type="dataset")

    reference = tmp_path / "reference"
    prepare_dataset(local / "ct", reference, val_fraction=0.3, progress=False, keep_identifiers=True)
    env = {**_client_env(hub, tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "ctpa_vq.cli", "prepare", "--input", "hf://datasets/lab/ctpa/ct",
               "--output", str(tmp_path / "out"), "--val-fraction", "0.3", "--keep-identifiers", "--no-progress"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "used 4 volume(s) of 3 patient(s)" in run.stdout
    assert _rows(tmp_path / "out") == _rows(reference)
    assert TOKEN not in run.stdout + run.stderr
    hub_cache = tmp_path / "hf_home"
    assert not hub_cache.exists() or not [p for p in hub_cache.rglob("*") if p.is_file()]  # no repo snapshot

    without_token = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    refused = subprocess.run([*command[:-4], "--output", str(tmp_path / "o2"), "--no-progress"], env=without_token,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "hf://datasets/lab/ctpa/ct: no such dataset repo or path, or no access to it" in refused.stderr
