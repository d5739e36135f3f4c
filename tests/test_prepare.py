"""``prepare``: directory of volumes -> DatasetDict, split by patient, pseudonymised, optionally
resampled; bad files reported, CLI exit codes."""

from __future__ import annotations

import hashlib
import hmac

import datasets
import nibabel as nib
import numpy as np
import pytest

from ctpa_vq.cli import main
from ctpa_vq.data.nifti import load_ct
from ctpa_vq.data.phantom import write_phantom_dir, write_phantom_nifti
from ctpa_vq.data.prepare import prepare_dataset, split_patients
from ctpa_vq.data.privacy import PseudonymKey

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


def _keyed_hash(key_file, text):
    """HMAC-SHA256 pseudonym computed here from the key file, independently of ctpa_vq.data.privacy."""
    secret = bytes.fromhex(open(key_file).read().strip())
    return "p" + hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:16]


def _hash_split(patients, val_fraction, seed=0):
    """The documented split, computed here: validation when SHA-256("ctpa-vq split", seed, patient),
    read as a number in [0, 1), is below the fraction (before the small-collection fallback)."""
    def unit(patient):
        digest = hashlib.sha256(f"ctpa-vq split\0{seed}\0{patient}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64
    val = sorted(p for p in patients if unit(p) < val_fraction)
    return sorted(set(patients) - set(val)), val


def test_prepare_writes_a_dataset_load_from_disk_opens(tmp_path, monkeypatch):
    key_file = tmp_path / "keys" / "my.key"
    monkeypatch.setenv("CTPA_VQ_KEY_FILE", str(key_file))
    inputs = tmp_path / "in"
    paths = write_phantom_dir(inputs, 5, SHAPE)
    report = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.2, progress=False)

    assert key_file.is_file() and (key_file.stat().st_mode & 0o777) == 0o600  # created on first use, private
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dataset) == {"train", "validation"}
    train, val = _hash_split([p.name.removesuffix(".nii.gz") for p in paths], 0.2)
    assert len(val) == 2  # this seed's draw: a fraction of 0.4 where 0.2 was asked, as a hash split of 5 gives
    assert (len(dataset["train"]), len(dataset["validation"])) == (len(train), len(val))
    assert len(report.used_files) == 5 and not report.skipped
    row = dataset["validation"][0]
    by_pseudonym = {_keyed_hash(key_file, p.name.removesuffix(".nii.gz")): p for p in paths}
    source = by_pseudonym[row["patient_id"]]
    volume = load_ct(source)
    assert row["source"] == _keyed_hash(key_file, source.name)
    assert report.val_patients == sorted(_keyed_hash(key_file, p) for p in val)
    assert tuple(row["shape"]) == tuple(row["source_shape"]) == volume.shape
    np.testing.assert_allclose(row["source_spacing"], volume.spacing)
    np.testing.assert_array_equal(np.frombuffer(row["hu"], np.int16).reshape(row["shape"]), volume.hu)
    np.testing.assert_allclose(row["spacing"], volume.spacing)
    np.testing.assert_allclose(row["affine"], volume.affine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "keys", "out"]  # no temporary directories left


def test_split_is_by_patient_and_deterministic(tmp_path):
    inputs = tmp_path / "in"
    for patient in range(6):  # two scans per patient, in the patient's own folder
        for scan in range(2):
            write_phantom_nifti(inputs / f"patient{patient}" / f"scan{scan}.nii.gz", SHAPE, seed=10 * patient + scan)
    report = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.34, seed=7, progress=False,
                             keep_identifiers=True)
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dataset["train"]["source"]) == {f"patient{p}/scan{s}.nii.gz" for p in range(6) for s in range(2)} \
        - set(dataset["validation"]["source"])

    train_ids = set(dataset["train"]["patient_id"])
    val_ids = set(dataset["validation"]["patient_id"])
    assert not train_ids & val_ids
    assert train_ids | val_ids == {f"patient{i}" for i in range(6)}
    assert (sorted(train_ids), sorted(val_ids)) == _hash_split([f"patient{i}" for i in range(6)], 0.34, seed=7)
    assert 0 < len(val_ids) < 6 and len(dataset["validation"]) == 2 * len(val_ids)
    assert (sorted(train_ids), sorted(val_ids)) == (report.train_patients, report.val_patients)
    assert split_patients([f"patient{i}" for i in range(6)], 0.34, seed=7) == (sorted(train_ids), sorted(val_ids))


def test_split_patients_edge_cases():
    assert split_patients(["a"], 0.2) == (["a"], [])
    assert split_patients(["a"], 0.99) == (["a"], [])  # one patient stays in train
    assert split_patients(["a", "b"], 0.01) in ((["a"], ["b"]), (["b"], ["a"]))  # at least one validates
    assert split_patients(list("abcdef"), 0.0) == (list("abcdef"), [])
    train, val = split_patients(list("abcdefgh"), 0.5, max_patients=4, seed=1)
    assert len(train) + len(val) == 4 and train and val

    # Each patient's split is its own: a patient keeps it whoever else is listed (so parts agree).
    many = [f"patient{i:04d}" for i in range(2000)]
    train, val = split_patients(many, 0.2, seed=3)
    assert (train, val) == _hash_split(many, 0.2, seed=3)
    assert 0.17 < len(val) / len(many) < 0.23
    assert split_patients(many[:1000], 0.2, seed=3)[1] == [p for p in val if p in many[:1000]]
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
    assert "used 3 volume(s)" in summary and "skipped 4" in summary and "truncated.nii.gz" in summary


def test_empty_directory_and_all_bad_files_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no volumes found"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out1", progress=False)

    bad = tmp_path / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), bad / "flat.nii.gz")
    with pytest.raises(ValueError, match="(?s)none of the 1 volume.*flat.nii.gz"):
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
    assert "used 3 volume(s)" in out and "skipped 4" in out and "flat.nii.gz" in out
    assert sum(len(split) for split in datasets.load_from_disk(str(tmp_path / "out")).values()) == 3

    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o2")]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o3")]) == 2
    assert main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_pseudonyms_depend_on_the_key_and_no_identifier_is_stored(tmp_path):
    inputs = tmp_path / "in"
    write_phantom_nifti(inputs / "Smith_John_1950" / "ctpa.nii.gz", SHAPE, seed=1)
    write_phantom_nifti(inputs / "Doe_Jane_1961.nii.gz", SHAPE, seed=2)
    ids = {}
    for key_name in ("a", "b"):
        key = PseudonymKey.load(tmp_path / f"{key_name}.key")
        prepare_dataset(inputs, tmp_path / key_name, val_fraction=0.0, progress=False, key=key)
        train = datasets.load_from_disk(str(tmp_path / key_name))["train"]
        ids[key_name] = set(train["patient_id"])
        assert ids[key_name] == {key.pseudonym("Smith_John_1950"), key.pseudonym("Doe_Jane_1961")}
        stored = b"".join(p.read_bytes() for p in (tmp_path / key_name).rglob("*") if p.is_file())
        for identifier in (b"Smith", b"Doe_Jane", b"1950", str(inputs).encode()):
            assert identifier not in stored
    assert not ids["a"] & ids["b"]


def test_a_damaged_key_file_is_refused_by_name(tmp_path):
    (tmp_path / "bad.key").write_text("not hex\n")
    with pytest.raises(ValueError, match="bad.key: not a pseudonymisation key"):
        PseudonymKey.load(tmp_path / "bad.key")


def test_a_key_file_that_is_not_text_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "binary.key").write_bytes(b"\x89\x00\xcc\xfe" * 8)  # e.g. a key saved as raw bytes
    with pytest.raises(ValueError, match="binary.key: not a pseudonymisation key \\(not text"):
        PseudonymKey.load(tmp_path / "binary.key")
    write_phantom_dir(tmp_path / "in", 1, SHAPE)
    assert main(["prepare", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--key-file", str(tmp_path / "binary.key"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "binary.key: not a pseudonymisation key" in error and "codec" not in error


def test_resampling_to_a_target_spacing_keeps_world_positions(tmp_path):
    inputs = tmp_path / "in"
    source = write_phantom_nifti(inputs / "p0.nii.gz", (17, 21, 24), seed=3, spacing=(1.0, 0.7, 0.7))
    report = prepare_dataset(inputs, tmp_path / "out", val_fraction=0.0, progress=False, target_spacing=(2.0, 1.4, 1.4))
    assert "resampled to 2 x 1.4 x 1.4 mm" in report.summary()

    row = datasets.load_from_disk(str(tmp_path / "out"))["train"][0]
    volume = load_ct(source)
    # Halving the grid: voxel (d, h, w) lands exactly on source voxel (2d, 2h, 2w).
    assert tuple(row["shape"]) == (9, 11, 12)
    assert tuple(row["source_shape"]) == (17, 21, 24)
    np.testing.assert_allclose(row["spacing"], (2.0, 1.4, 1.4))
    np.testing.assert_allclose(row["source_spacing"], (1.0, 0.7, 0.7))
    hu = np.frombuffer(row["hu"], np.int16).reshape(row["shape"])
    np.testing.assert_array_equal(hu, volume.hu[::2, ::2, ::2])
    d, h, w = np.indices(hu.shape).reshape(3, -1)
    world = np.asarray(row["affine"]) @ np.stack([w, h, d, np.ones_like(d)])
    np.testing.assert_allclose(world, volume.affine @ np.stack([2 * w, 2 * h, 2 * d, np.ones_like(d)]), atol=1e-9)
