"""`ctpa-vq evaluate`: per-volume PSNR/SSIM (whole, body) and region HU errors over NIfTI or a prepared split."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from ctpa_vq import VQGAN3D
from ctpa_vq.cli import main
from ctpa_vq.data.nifti import load_ct
from ctpa_vq.data.phantom import write_phantom_nifti
from ctpa_vq.data.prepare import prepare_dataset
from ctpa_vq.evaluation.metrics import reconstruction_metrics
from ctpa_vq.pipelines import load_reconstruction_pipeline

PATCH = ["--patch", "16", "32", "32"]


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny")
    model(torch.rand(1, 1, 16, 32, 32) * 2 - 1)  # initialise the codebook from data
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for seed in range(3):
        write_phantom_nifti(folder / f"patient{seed}.nii.gz", (20, 40, 36), seed=seed)
    return folder


def test_evaluate_folder_matches_the_pipeline_and_writes_csv(model_dir, scans, tmp_path, capsys):
    out_csv = tmp_path / "scores.csv"
    assert main(["evaluate", "--model", str(model_dir), "--input", str(scans), *PATCH, "--no-progress",
                 "--csv", str(out_csv), "--keep-identifiers"]) == 0  # fmt: skip
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["name"].rsplit("/", 1)[-1] for r in rows] == [f"patient{i}.nii.gz" for i in range(3)]
    assert "mean over 3 volumes" in capsys.readouterr().out

    # The score of a volume is its reconstruction's: PSNR by its definition (both clipped to the window,
    # the window width as the peak), independently of the metrics module ...
    pipeline = load_reconstruction_pipeline(model_dir)
    hu = load_ct(scans / "patient1.nii.gz").hu
    reconstruction = pipeline(hu, patch_size=(16, 32, 32)).reconstruction
    low, high = pipeline.window
    error = np.clip(reconstruction.astype(np.float64), low, high) - np.clip(hu.astype(np.float64), low, high)
    assert float(rows[1]["psnr"]) == pytest.approx(10 * np.log10((high - low) ** 2 / np.mean(error**2)), abs=1e-3)
    # ... and the SSIM and region figures the metrics module gives (tested on their own in test_metrics_body)
    direct = reconstruction_metrics(reconstruction, hu, pipeline.window)
    assert float(rows[1]["ssim"]) == pytest.approx(direct.ssim, abs=1e-5)
    assert float(rows[1]["body_psnr"]) == pytest.approx(direct.body_psnr, abs=1e-4)
    assert float(rows[1]["body_ssim"]) == pytest.approx(direct.body_ssim, abs=1e-5)
    for region in ("body", "lung", "soft_tissue", "vessel", "bone"):
        assert float(rows[1][f"mae_{region}"]) == pytest.approx(direct.mae[region], rel=1e-5, nan_ok=True), region


def test_evaluate_prepared_split(model_dir, scans, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    report = prepare_dataset(scans, prepared, val_fraction=0.34, progress=False)
    assert main(["evaluate", "--model", str(model_dir), "--input", str(prepared), *PATCH, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"mean over {len(report.val_patients)} volumes" in out
    assert all(patient in out for patient in report.val_patients)


def test_evaluate_without_volumes_names_the_folder(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--model", str(model_dir), "--input", str(empty), "--no-progress"]) == 2
    assert str(empty) in capsys.readouterr().err
