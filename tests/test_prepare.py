"""``prepare``: NIfTI directory -> DatasetDict, split by patient, bad files reported, CLI exit codes."""

from __future__ import annotations

import hashlib

import datasets
import nibabel as nib
import numpy as np
import pytest

from ctpa_vq.cli import main
from ctpa_vq.data.nifti import load_ct
from ctpa_vq.data.phantom import write_phantom_dir, write_phantom_nifti
from ctpa_vq.data.prepare import prepare_dataset, split_patients

SHAPE = (16, 20, 24)


def _digest(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _add_bad_files(directory):
    """Truncated, 2D, 4D and NaN files next to good ones."""
    good = (directory / "phantom_000.nii.gz").read_bytes()
    (directory / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), directory / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), directory / "series.nii")
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), directory / "nan.nii.gz")


def test_prepare_writes_a_dataset_load_from_disk_opens(tmp_path):
    inputs = tmp_path / "in"
    paths = write_phantom_dir(inputs, 5, SHAPE)
    report = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.2, progress=False)

    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dataset) == {"train", "validation"}
    assert (len(dataset["train"]), len(dataset["validation"])) == (4, 1)
    assert len(report.used_files) == 5 and not report.skipped
    row = dataset["validation"][0]
    source = next(p for p in paths if p.name.startswith(row["patient_id"]))
    volume = load_ct(source)
    assert row["source"] == str(source)
    assert tuple(row["shape"]) == volume.shape
    np.testing.assert_array_equal(np.frombuffer(row["hu"], np.int16).reshape(row["shape"]), volume.hu)
    np.testing.assert_allclose(row["spacing"], volume.spacing)
    np.testing.assert_allclose(row["affine"], volume.affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary directories left


def test_split_is_by_patient_and_deterministic(tmp_path):
    inputs = tmp_path / "in"
    for patient in range(6):  # two scans per patient, in the patient's own folder
        for scan in range(2):
            write_phantom_nifti(inputs / f"patient{patient}" / f"scan{scan}.nii.gz", SHAPE, seed=10 * patient + scan)
    report = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.34, seed=7, progress=False)
    dataset = datasets.load_from_disk(str(tmp_path / "out"))

    train_ids = set(dataset["train"]["patient_id"])
    val_ids = set(dataset["validation"]["patient_id"])
    assert not train_ids & val_ids
    assert train_ids | val_ids == {f"patient{i}" for i in range(6)}
    assert len(val_ids) == 2 and len(dataset["validation"]) == 4
    assert (sorted(train_ids), sorted(val_ids)) == (report.train_patients, report.val_patients)
    assert split_patients([f"patient{i}" for i in range(6)], 0.34, seed=7) == (sorted(train_ids), sorted(val_ids))


def test_split_patients_edge_cases():
    assert split_patients(["a"], 0.2) == (["a"], [])
    assert split_patients(["a", "b"], 0.01) in ((["a"], ["b"]), (["b"], ["a"]))
    assert split_patients(list("abcdef"), 0.0) == (list("abcdef"), [])
    train, val = split_patients(list("abcdefgh"), 0.5, max_patients=4, seed=1)
    assert len(train) == 2 and len(val) == 2
    with pytest.raises(ValueError, match="val_fraction"):
        split_patients(["a"], 1.0)


def test_max_patients_and_train_only(tmp_path):
    write_phantom_dir(tmp_path / "in", 4, SHAPE, compressed=False)
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.0, max_patients=3, progress=False)
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dataset) == {"train"} and len(dataset["train"]) == 3
    assert len(report.train_patients) == 3 and report.val_patients == []


def test_bad_files_are_skipped_by_name_and_inputs_are_untouched(tmp_path):
    inputs = tmp_path / "in"
    write_phantom_dir(inputs, 3, SHAPE)
    _add_bad_files(inputs)
    before = _digest(inputs)

    report = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.0, progress=False)

    assert _digest(inputs) == before
    assert len(report.used_files) == 3
    reasons = dict((p.name, r) for p, r in report.skipped)
    assert set(reasons) == {"truncated.nii.gz", "flat.nii.gz", "series.nii", "nan.nii.gz"}
    assert "truncated or corrupt" in reasons["truncated.nii.gz"]
    assert "2D" in reasons["flat.nii.gz"]
    assert "4D with 2 volumes" in reasons["series.nii"]
    assert "NaN" in reasons["nan.nii.gz"]
    assert all(name in reason for name, reason in reasons.items())
    summary = report.summary()
    assert "used 3 file(s)" in summary and "skipped 4" in summary and "truncated.nii.gz" in summary


def test_empty_directory_and_all_bad_files_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .nii or .nii.gz files"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out1", progress=False)

    bad = tmp_path / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), bad / "flat.nii.gz")
    with pytest.raises(ValueError, match="(?s)none of the 1 NIfTI file.*flat.nii.gz"):
        prepare_dataset(bad, tmp_path / "out2", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty"]  # nothing half-written

    with pytest.raises(FileNotFoundError, match="missing"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out3", progress=False)


def test_existing_output_needs_overwrite(tmp_path):
    write_phantom_dir(tmp_path / "in", 2, SHAPE, compressed=False)
    prepare_dataset(tmp_path / "in", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="already exists"):
        prepare_dataset(tmp_path / "in", tmp_path / "out", progress=False)
    prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.0, overwrite=True, progress=False)
    assert set(datasets.load_from_disk(str(tmp_path / "out"))) == {"train"}


def test_cli_prepare_exit_codes(tmp_path, capsys):
    write_phantom_dir(tmp_path / "in", 3, SHAPE)
    _add_bad_files(tmp_path / "in")
    assert main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--val-fraction", "0.3", "--max-patients", "7", "--seed", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "used 3 file(s)" in out and "skipped 4" in out and "flat.nii.gz" in out
    assert sum(len(split) for split in datasets.load_from_disk(str(tmp_path / "out")).values()) == 3

    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o2")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o3")]) == 2
    assert main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
