"""What a model was trained on (`training_data` in its config) and the checks of each volume against it:
the pipeline, `reconstruct`, `evaluate` and `encode` warn outside the record and stay silent inside it
and for older models; `--spacing training` runs at the median training spacing, back on the input's grid."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctpa_vq import VQGAN3D
from ctpa_vq.cli import main
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.models.input_spec import InputSpecWarning, describe_training_data, training_spacing
from ctpa_vq.pipelines import CTPAReconstructionPipeline
from ctpa_vq.pipelines.spacing import reconstruct_volume

WINDOW = (-1024.0, 2048.0)
FAST = ["--patch", "16", "32", "32", "--no-progress"]


SPACINGS = [(0.6, 0.7, 0.7), (1.0, 0.75, 0.75), (1.25, 0.8, 0.8)]  # slices 0.6 to 1.25 mm, in-plane 0.7 to 0.8


def _record() -> dict:
    """Trained on three volumes at `SPACINGS`, like the phantoms used here (one measured)."""
    return describe_training_data(SPACINGS, [make_phantom((12, 32, 32), seed=4)], WINDOW, (16, 32, 32))


def test_the_record_holds_ranges_and_counts_measured_by_hand():
    volumes = [np.zeros((8, 4, 4), np.int16), np.full((8, 4, 4), 3000, np.int16)]  # the second clips wholly
    volumes[0][0, 0, :2] = -2000  # 2 of the 32 voxels of its slice 0 (every 4th slice is measured: 0 and 4)
    volumes[0][1, 0, :2] = -2000  # not measured
    record = describe_training_data(SPACINGS, volumes, WINDOW, (16, 32, 32))
    assert record["volumes"] == 3 and record["patch_size"] == [16, 32, 32] and record["hu_window"] == list(WINDOW)
    assert record["spacing_mm"] == {"min": [0.6, 0.7, 0.7], "median": [1.0, 0.75, 0.75], "max": [1.25, 0.8, 0.8]}
    assert record["clipped_fraction"] == {"mean": (2 / 32 + 1) / 2, "max": 1.0, "volumes_measured": 2}
    assert record["orientation"].startswith("RAS")
    assert training_spacing(record) == (1.0, 0.75, 0.75)
    with pytest.raises(ValueError, match="records no training data spacing"):
        training_spacing(None)


def _pipeline(record: dict | None) -> CTPAReconstructionPipeline:
    torch.manual_seed(0)
    pipe = CTPAReconstructionPipeline(VQGAN3D.from_preset("tiny", training_data=record))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _nifti(path: Path, slice_mm: float, hu: np.ndarray | None = None) -> Path:
    hu = make_phantom((12, 32, 32), seed=3) if hu is None else hu
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([0.75, 0.75, slice_mm, 1.0])), path)
    return path


def _warnings_of(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, InputSpecWarning)]


def test_pipeline_warns_once_outside_the_recorded_spacing_and_not_inside(tmp_path):
    pipe = _pipeline(_record())
    thick = _nifti(tmp_path / "thick.nii.gz", 5.0)
    found = _warnings_of(lambda: pipe(thick, patch_size=(16, 32, 32)))
    assert found == [f"{thick}: slice spacing 5 mm; this model saw 0.6-1.25 mm: resample with --spacing training"]
    assert _warnings_of(lambda: pipe(_nifti(tmp_path / "fine.nii.gz", 1.25), patch_size=(16, 32, 32))) == []
    volume = make_phantom((12, 32, 32), seed=3)  # an array: the spacing given, else none checked
    assert _warnings_of(lambda: pipe.encode_volume(volume, patch_size=(16, 32, 32))) == []
    found = _warnings_of(lambda: pipe.encode_volume(volume, patch_size=(16, 32, 32), spacing=(1.0, 2.0, 0.75),
                                                    name="case 7"))  # fmt: skip
    assert found == ["case 7: row spacing (H) 2 mm; this model saw 0.7-0.8 mm: resample with --spacing training"]


def test_a_volume_that_is_not_hounsfield_units_warns_with_its_clipped_fraction():
    raw = make_phantom((12, 32, 32), seed=3).astype(np.float32) + 3000.0  # e.g. unsigned scanner values
    found = _warnings_of(lambda: _pipeline(_record())(raw, patch_size=(16, 32, 32), spacing=(1.0, 0.75, 0.75)))
    clipped_in_training = _record()["clipped_fraction"]["max"]
    assert len(found) == 1 and "lie outside the HU window [-1024, 2048]" in found[0]
    assert f"the training volumes had at most {clipped_in_training:.1%}" in found[0]


def test_a_model_without_the_record_runs_as_before_without_a_warning(tmp_path):
    pipe = _pipeline(None)
    pipe.save_pretrained(tmp_path / "old")
    config = (tmp_path / "old" / "vqgan" / "config.json")
    config.write_text(config.read_text().replace('"training_data": null,', ""))  # as exported before the record
    old = CTPAReconstructionPipeline.from_pretrained(tmp_path / "old")
    old.set_progress_bar_config(disable=True)
    thick = _nifti(tmp_path / "thick.nii.gz", 5.0)
    assert _warnings_of(lambda: old(thick, patch_size=(16, 32, 32))) == []
    np.testing.assert_array_equal(old(thick, patch_size=(16, 32, 32)).reconstruction,
                                  pipe(thick, patch_size=(16, 32, 32)).reconstruction)


def test_reconstruct_at_the_training_spacing_lands_on_the_input_grid(tmp_path, capsys):
    pipe = _pipeline(_record())
    pipe.save_pretrained(tmp_path / "model")
    thick = _nifti(tmp_path / "thick.nii.gz", 2.5)
    out = tmp_path / "out.nii.gz"
    reconstruct = ["reconstruct", "--model", str(tmp_path / "model"), "--input", str(thick), *FAST]
    assert main([*reconstruct, "--output", str(tmp_path / "as-is.nii.gz")]) == 0
    assert "warning: " + str(thick) + ": slice spacing 2.5 mm" in capsys.readouterr().err
    assert main([*reconstruct, "--output", str(out), "--spacing", "training"]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err and "at 1 x 0.75 x 0.75 mm" in printed.out  # it ran at the median spacing
    written, given = nib.load(out), nib.load(thick)
    assert written.shape == given.shape and np.array_equal(written.affine, given.affine)
    # the same as resampling by hand: 2.5 mm slices -> 1.0 mm (29 slices), reconstruct, back
    from ctpa_vq.data.resample import resample

    hu = make_phantom((12, 32, 32), seed=3)
    at_training = resample(hu, (2.5, 0.75, 0.75), (1.0, 0.75, 0.75))
    assert at_training.shape == (28, 32, 32)
    expected = resample(pipe(at_training, patch_size=(16, 32, 32)).reconstruction, (1.0, 0.75, 0.75),
                        (2.5, 0.75, 0.75), shape=hu.shape)  # fmt: skip
    np.testing.assert_allclose(reconstruct_volume(pipe, thick, "training", patch_size=(16, 32, 32)), expected)
    without = tmp_path / "old"
    _pipeline(None).save_pretrained(without)
    code = main(["reconstruct", "--model", str(without), "--input", str(thick), "--output", str(tmp_path / "o.nii.gz"),
                 "--spacing", "training", *FAST])  # fmt: skip
    assert code == 2 and "records no training data spacing" in capsys.readouterr().err


def test_evaluate_and_encode_name_the_volume_outside_the_record(tmp_path, capsys):
    from ctpa_vq.latents.encode import encode_dataset

    pipe = _pipeline(_record())
    pipe.vqgan.register_to_config(latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
    pipe.save_pretrained(tmp_path / "model")
    folder = tmp_path / "scans"
    folder.mkdir()
    _nifti(folder / "thick.nii.gz", 5.0)
    _nifti(folder / "fine.nii.gz", 1.0)
    args = ["evaluate", "--model", str(tmp_path / "model"), "--input", str(folder), "--keep-identifiers", *FAST]
    assert main(args) == 0
    printed = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert printed == ["ctpa-vq evaluate: warning: thick.nii.gz: slice spacing 5 mm; this model saw 0.6-1.25 mm: "
                       "resample with --spacing training"]  # fmt: skip
    assert main([*args, "--spacing", "training"]) == 0  # both volumes run at 1 x 0.75 x 0.75 mm: no warning
    printed = capsys.readouterr()
    assert "warning" not in printed.err and printed.out.count("at 1 x 0.75 x 0.75 mm") == 2
    found = _warnings_of(lambda: encode_dataset(tmp_path / "model", folder, tmp_path / "latents", patch_size=(16, 32, 32),
                                                progress=False, pseudonymise=str))  # fmt: skip
    assert len(found) == 1 and "slice spacing 5 mm" in found[0]
