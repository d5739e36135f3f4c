"""`ctpa-vq encode`: two real processes (accelerate launch, gloo on CPU), a resume, and the numbers.

Each row is checked against an independent computation: the model applied to the whole volume
(the patch covers it, so no stitching), the scaling done by hand, and the nearest code found with
`torch.cdist` against the codebook.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline
from ctpa_vq.data.nifti import load_ct
from ctpa_vq.data.patch_dataset import VolumeStore
from ctpa_vq.data.prepare import prepare_dataset
from ctpa_vq.data.privacy import PseudonymKey
from ctpa_vq.latents.encode import encode_dataset, encoded_ids, latents_as_tensor, list_volumes, load_encoded

ACCELERATE_CPU = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu.yaml"  # torchrun + gloo
WINDOW = (-1024.0, 2048.0)
SHAPES = {"p01": (16, 24, 20), "p02": (12, 16, 16), "p03": (20, 16, 24), "p04": (16, 16, 16), "p05": (12, 20, 16)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Five patients as real NIfTI files (X, Y, Z on disk), prepared, and a tiny model with latent stats."""
    root = tmp_path_factory.mktemp("encode")
    rng = np.random.default_rng(0)
    (root / "nifti").mkdir()
    for name, (d, h, w) in SHAPES.items():
        hu = rng.integers(-1024, 1500, (w, h, d), dtype=np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 1.5, 1.0])), root / "nifti" / f"{name}.nii.gz")
    prepare_dataset(root / "nifti", root / "prepared", val_fraction=0.4, progress=False)
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny", latents_mean=[0.1 * c for c in range(8)], latents_std=[1.0 + 0.5 * c for c in range(8)])
    CTPAReconstructionPipeline(model).save_pretrained(root / "model")
    return root


def _expected(model: VQGAN3D, hu: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents `(C, d, h, w)` and nearest-code indices `(d, h, w)` of the whole volume, directly."""
    low, high = WINDOW
    unit = torch.as_tensor((np.clip(hu.astype(np.float32), low, high) - low) / (high - low) * 2 - 1)
    with torch.no_grad():
        z = model.encode(unit[None, None])[0]
    vectors = z.reshape(z.shape[0], -1).T
    indices = torch.cdist(vectors, model.quantizer.embedding).argmin(dim=1).reshape(z.shape[1:])
    return z, indices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_encode_with_two_processes_resumes_and_matches_the_model(data, tmp_path):
    output = tmp_path / "latents"
    first = encode_dataset(data / "model", data / "prepared", output, splits=["validation"], patch_size=(32, 32, 32),
                           volumes_per_shard=1, progress=False)  # an earlier run that did one split only
    assert first.encoded == 2 and first.skipped == 0
    # a killed process of an 8-process run leaves its open shard's temporary file (`atomic_path`'s name)
    (output / "data" / ".shard-r007-0123456789ab.parquet.k1ll3d.parquet").write_bytes(b"half a shard")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
               "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "ctpa_vq.cli", "encode",
               "--model", str(data / "model"), "--input", str(data / "prepared"), "--output", str(output),
               "--patch", "32", "32", "32", "--volumes-per-shard", "1", "--no-progress"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    reports = [line for line in run.stdout.splitlines() if line.startswith("encoded")]
    assert sorted(line.split()[1] for line in reports) == ["1", "2"]  # 3 train volumes over 2 processes
    assert all("skipped 2 already encoded" in line for line in reports)

    shards = sorted(p.name for p in (output / "data").iterdir())
    assert not [name for name in shards if name.startswith(".")]  # no temporary file left
    assert {name[len("shard-r"):][:3] for name in shards} == {"000", "001"}  # both processes wrote
    assert len(shards) == 5

    volumes = {v.volume_id: v for v in list_volumes(data / "prepared")}
    assert encoded_ids(output) == set(volumes)
    table = load_encoded(output, cache_dir=str(tmp_path / "cache"))
    stored_ids = [i for split in ("train", "validation") for i in VolumeStore.from_disk(data / "prepared", split).patient_ids]
    assert len(table) == 5 and sorted(table["patient_id"]) == sorted(stored_ids)  # as `prepare` stored them
    model = VQGAN3D.from_pretrained(data / "model", subfolder="vqgan").eval()
    mean = torch.tensor(model.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(-1, 1, 1, 1)
    name_of_shape = {shape: name for name, shape in SHAPES.items()}  # the shapes tell the volumes apart
    for row in table:
        source = load_ct(data / "nifti" / f"{name_of_shape[tuple(row['volume_shape'])]}.nii.gz")
        assert tuple(row["volume_shape"]) == source.shape
        assert row["spacing"] == pytest.approx([1.5, 0.8, 0.8])
        np.testing.assert_allclose(row["affine"], source.affine)
        z, indices = _expected(model, source.hu)
        assert tuple(row["latent_shape"]) == model.latent_shape(source.shape)
        torch.testing.assert_close(latents_as_tensor(row, "latents"), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(latents_as_tensor(row), (z - mean) / std, rtol=1e-5, atol=1e-5)
        got = torch.as_tensor(row["indices"]).reshape(z.shape[1:])
        assert (got == indices).float().mean() > 0.999  # ties at float precision aside
    assert set(table["split"]) == {"train", "validation"}
    assert len(load_encoded(output, split="validation", cache_dir=str(tmp_path / "cache"))) == 2

    again = encode_dataset(data / "model", data / "prepared", output, patch_size=(32, 32, 32), progress=False)
    assert again.encoded == 0 and again.skipped == 5  # a finished run is a no-op


def test_encode_a_folder_with_pseudonyms_and_a_broken_file(data, tmp_path):
    folder = tmp_path / "volumes"
    shutil.copytree(data / "nifti", folder)
    (folder / "p06.nii.gz").write_bytes(b"not a NIfTI file")
    key = PseudonymKey.load(tmp_path / "key")
    report = encode_dataset(data / "model", folder, tmp_path / "out", patch_size=(32, 32, 32),
                            volumes_per_shard=2, progress=False, pseudonymise=key.pseudonym)
    assert report.encoded == 5 and len(list((tmp_path / "out" / "data").glob("shard-*.parquet"))) == 3
    assert len(report.failed) == 1 and "p06.nii.gz" in report.failed[0]
    table = load_encoded(tmp_path / "out", cache_dir=str(tmp_path / "cache"))
    assert sorted(table["patient_id"]) == sorted(key.pseudonym(name) for name in SHAPES)  # as `prepare` stores them
    assert set(table["split"]) == {""}
    # no names: ids are bare hashes (a pseudonym "p04..." may start like the name "p04" by chance), the info file
    # names no volume or path
    assert all(re.fullmatch("[0-9a-f]{24}", volume_id) for volume_id in table["volume_id"])
    info = (tmp_path / "out" / "encode_info.json").read_text()
    assert not [name for name in [*SHAPES, "nii", str(tmp_path)] if name in info]

    bare = tmp_path / "no-stats"
    VQGAN3D.from_preset("tiny").save_pretrained(bare)
    with pytest.raises(ValueError, match="latent-stats"):
        encode_dataset(bare, data / "nifti", tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="no-such"):
        encode_dataset(data / "model", tmp_path / "no-such", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="no split"):
        encode_dataset(data / "model", data / "prepared", tmp_path / "x", splits=["test"], progress=False)
