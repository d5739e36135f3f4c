"""`ctpa-vq prepare` / `reconstruct` / `evaluate` on clinical inputs: DICOM series folders and NRRD files,
end to end, with identifiers kept out of datasets and printed output."""

from __future__ import annotations

import csv

import datasets
import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from ctpa_vq import VQGAN3D
from ctpa_vq.cli import main
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.data.privacy import PseudonymKey
from ctpa_vq.data.volume_io import load_volume
from ctpa_vq.pipelines import load_reconstruction_pipeline

from dicom_series import PATIENT_ID, PATIENT_NAME, expected_affine, make_undecodable, oblique_orientation, write_series

FAST = ["--patch", "8", "16", "16", "--batch-size", "8", "--no-progress"]
TAG_VALUES = (PATIENT_NAME.encode(), PATIENT_ID.encode(), b"Elsewhere", b"19500101")  # in every test slice


def _nrrd(path, data_zyx, spacing=(0.8, 0.6, 2.0), origin=(10.0, -20.0, 30.0)):
    image = sitk.GetImageFromArray(data_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def test_prepare_reads_dicom_and_nrrd_skips_bad_series_and_stores_no_identifier(tmp_path, capsys):
    inputs = tmp_path / "in"
    good = write_series(inputs / "patientA" / "study", make_phantom((8, 20, 24), seed=1))
    write_series(inputs / "patientA" / "study", make_phantom((2, 20, 24), seed=2), series_number=9,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), file_prefix="scout")
    _nrrd(inputs / "patientB" / "ct.nrrd", make_phantom((9, 12, 14), seed=3))
    write_series(inputs / "patientC", make_phantom((6, 20, 24), seed=4), steps=[2.5, 2.5, 7.5, 2.5, 2.5])
    undecodable = write_series(inputs / "patientD", make_phantom((4, 20, 24), seed=5), shuffle=False)
    make_undecodable(undecodable[1])

    rc = main(["prepare", "--input", str(inputs), "--output", str(tmp_path / "out"), "--val-fraction", "0",
               "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0
    assert "used 2 volume(s) of 2 patient(s)" in printed.out and "skipped 3" in printed.out
    assert f"{inputs / 'patientA' / 'study'}#2: a localizer (scout) series, not a CT volume" in printed.out
    assert f"{inputs / 'patientC'}: missing slices: a gap of 7.500 mm" in printed.out
    assert f"{undecodable[1]}: pixel data in the compressed transfer syntax 'JPEG 2000" in printed.out

    train = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    key = PseudonymKey.load()
    assert sorted(train["patient_id"]) == sorted([key.pseudonym("patientA"), key.pseudonym("patientB")])
    row = train[train["patient_id"].index(key.pseudonym("patientA"))]
    volume = load_volume(good[0].parent)
    np.testing.assert_array_equal(np.frombuffer(row["hu"], np.int16).reshape(row["shape"]), volume.hu)
    np.testing.assert_allclose(row["affine"], volume.affine)

    stored = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert b"patientA" not in stored and b"patientB" not in stored
    for identifier in TAG_VALUES:
        assert identifier not in stored
        assert identifier.decode() not in printed.out + printed.err


def test_reconstruct_dicom_folder_writes_nifti_on_the_series_grid(model_dir, tmp_path, capsys):
    slices = make_phantom((10, 24, 20), seed=6)
    files = write_series(tmp_path / "series", slices, orientation=oblique_orientation())
    out = tmp_path / "out.nii"  # uncompressed, so its bytes can be searched for identifiers
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(tmp_path / "series"),
                 "--output", str(out), *FAST]) == 0
    printed = capsys.readouterr()
    assert "PSNR" in printed.out

    written = nib.load(out)
    assert written.shape == (20, 24, 10)  # (columns, rows, slices)
    np.testing.assert_allclose(written.affine, expected_affine(files), atol=1e-5)
    ct = load_volume(tmp_path / "series")
    pipeline = load_reconstruction_pipeline(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    expected = np.rint(pipeline(ct.hu, patch_size=(8, 16, 16), batch_size=8).reconstruction).astype(np.int16)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), ct.to_source_orientation(expected))
    for identifier in TAG_VALUES:
        assert identifier not in out.read_bytes() and identifier.decode() not in printed.out + printed.err


def test_reconstruct_nrrd_to_nrrd_keeps_its_geometry(model_dir, tmp_path):
    source = _nrrd(tmp_path / "ct.nrrd", make_phantom((9, 12, 14), seed=7))
    out = tmp_path / "out.nrrd"
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(source), "--output", str(out), *FAST]) == 0
    original, written = sitk.ReadImage(str(source)), sitk.ReadImage(str(out))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing())
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin())
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection())


def test_reconstruct_at_a_model_spacing_lands_back_on_the_input_grid(model_dir, tmp_path, capsys):
    slices = make_phantom((12, 24, 20), seed=8)
    files = write_series(tmp_path / "series", slices, pixel_spacing=(0.7, 0.7))
    out = tmp_path / "out.nii"
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(tmp_path / "series"),
                 "--output", str(out), "--spacing", "5", "1.4", "1.4", *FAST]) == 0
    assert "PSNR" in capsys.readouterr().out
    written = nib.load(out)
    assert written.shape == (20, 24, 12)
    np.testing.assert_allclose(written.affine, expected_affine(files), atol=1e-5)


def test_evaluate_scores_dicom_and_nrrd_and_prints_pseudonyms(model_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    write_series(inputs / "Doe_Janet", make_phantom((8, 20, 24), seed=9))
    _nrrd(inputs / "Roe_Richard.nrrd", make_phantom((9, 12, 14), seed=10))
    write_series(inputs / "scout", make_phantom((2, 20, 24), seed=13), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    out_csv = tmp_path / "scores.csv"
    assert main(["evaluate", "--model", str(model_dir), "--input", str(inputs), "--patch", "8", "16", "16",
                 "--no-progress", "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out_csv.open()))
    key = PseudonymKey.load()
    assert [r["name"] for r in rows] == [key.pseudonym("Doe_Janet"), key.pseudonym("Roe_Richard.nrrd")]
    assert "Doe" not in printed and "Roe" not in printed and "Doe" not in out_csv.read_text()
    assert f"skipped {inputs / 'scout'}: a localizer (scout) series, not a CT volume" in printed  # not a failure


def test_latent_stats_reads_a_dicom_series_folder_and_an_nrrd(tmp_path, capsys):
    torch.manual_seed(0)
    model = tmp_path / "model"
    VQGAN3D.from_preset("tiny").save_pretrained(model)
    write_series(tmp_path / "series", make_phantom((8, 16, 16), seed=11))
    nrrd = _nrrd(tmp_path / "ct.nrrd", make_phantom((8, 16, 16), seed=12))
    assert main(["latent-stats", "--model", str(model), "--input", str(tmp_path / "series"), str(nrrd),
                 "--patch", "8", "16", "16", "--no-progress"]) == 0
    assert "channel 0" in capsys.readouterr().out

    pipeline = load_reconstruction_pipeline(model)
    latents = torch.cat([pipeline.encode_volume(load_volume(p).hu, patch_size=(8, 16, 16))
                         for p in (tmp_path / "series", nrrd)], dim=2)
    scaled = pipeline.vqgan.scale_latents(latents).transpose(0, 1).reshape(latents.shape[1], -1)
    torch.testing.assert_close(scaled.mean(dim=1), torch.zeros(latents.shape[1]), atol=1e-4, rtol=0)
