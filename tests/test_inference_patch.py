"""The inference patch a model stores (`inference_patch_size`): what training records, what the pipeline,
validation and the command line reconstruct with by default, and how to ask for the planned grid."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from ctpa_vq import CTPAReconstructionPipeline, VQGAN3D
from ctpa_vq.cli import main
from ctpa_vq.data.patch_dataset import VolumeStore
from ctpa_vq.evaluation.metrics import psnr_hu
from ctpa_vq.training.config import load_config
from ctpa_vq.training.loop import train
from ctpa_vq.training.memory import validation_patch
from ctpa_vq.training.pretrained import inference_patch


def _pipeline(model: VQGAN3D) -> CTPAReconstructionPipeline:
    pipeline = CTPAReconstructionPipeline(model.eval())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _patches_seen(pipeline: CTPAReconstructionPipeline, hu: np.ndarray, **kwargs) -> list[tuple[int, ...]]:
    seen = []
    hook = pipeline.vqgan.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    try:
        pipeline(hu, **kwargs)
    finally:
        hook.remove()
    return seen


def test_the_default_grid_is_the_stored_patch_with_a_quarter_overlap():
    """8 x 16 x 16 patches, 25% overlap, align 4: strides 4 x 12 x 12 (by hand), so a 20 x 40 x 24 volume
    takes origins D 0 4 8 12, H 0 12 24, W 0 8 (the last clamped to the edge): 24 patches of the stored size."""
    torch.manual_seed(0)
    pipeline = _pipeline(VQGAN3D.from_preset("tiny", inference_patch_size=(8, 16, 16)))
    grid = pipeline.patch_grid((20, 40, 24))
    assert grid.patch_size == (8, 16, 16)
    assert grid.axis_origins == ((0, 4, 8, 12), (0, 12, 24), (0, 8))
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(20, 40, 24)).astype(np.float32)
    assert _patches_seen(pipeline, hu, batch_size=1) == [(8, 16, 16)] * 24


def test_planned_is_asked_for_by_name_and_taken_when_the_stored_patch_is_over_budget():
    torch.manual_seed(0)
    pipeline = _pipeline(VQGAN3D.from_preset("tiny", inference_patch_size=(8, 16, 16)))
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(20, 40, 24)).astype(np.float32)
    assert _patches_seen(pipeline, hu, patch_size="planned") == [(20, 40, 24)]  # one patch: the whole volume
    large = _pipeline(VQGAN3D.from_preset("tiny", inference_patch_size=(16, 32, 32)))
    small = large.patch_grid((20, 40, 24), max_patch_voxels=16000)  # < 16 * 32 * 32: planned within the budget
    assert small.patch_size != (16, 32, 32) and np.prod(small.patch_size) <= 16000 and len(small) == 2
    with pytest.raises(ValueError, match="'planned'"):
        pipeline.patch_grid((20, 40, 24), patch_size="largest")


def test_a_model_saved_before_the_field_keeps_the_planned_grid(tmp_path):
    torch.manual_seed(0)
    VQGAN3D.from_preset("tiny", inference_patch_size=(8, 16, 16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["inference_patch_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    pipeline = _pipeline(VQGAN3D.from_pretrained(tmp_path))
    assert pipeline.vqgan.config.inference_patch_size is None
    assert pipeline.patch_grid((20, 40, 24)).patch_size == (20, 40, 24)


def test_only_groupnorm_models_leave_the_patch_to_the_planner():
    assert inference_patch("none", (16, 32, 32)) == [16, 32, 32]
    assert inference_patch("batch", (16, 32, 32)) == [16, 32, 32]
    assert inference_patch("group", (16, 32, 32)) is None


def test_the_command_line_takes_planned_or_three_sizes(tmp_path, capsys):
    import nibabel as nib

    torch.manual_seed(0)
    VQGAN3D.from_preset("tiny", inference_patch_size=(8, 16, 16)).save_pretrained(tmp_path / "model")
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(20, 40, 24)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "in.nii.gz")
    base = ["reconstruct", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "in.nii.gz"), "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "stored.nii.gz")]) == 0
    assert "patches of 8 x 16 x 16 voxels" in capsys.readouterr().out
    assert main([*base, "--output", str(tmp_path / "planned.nii.gz"), "--patch", "planned"]) == 0
    assert "1 x 1 x 1 = 1 patches of" in capsys.readouterr().out
    assert main([*base, "--output", str(tmp_path / "bad.nii.gz"), "--patch", "8", "16"]) == 2
    assert "--patch 8 16" in capsys.readouterr().err
    assert not (tmp_path / "bad.nii.gz").exists()


def test_training_records_its_patch_and_validation_scores_with_it(tmp_path):
    """A run's export stores the training patch; validation (no `val_patch_size`) and verify's memory trace
    use it, so `val_psnr` is what a user gets from the exported pipeline's default on the same volume."""
    out = tmp_path / "run"
    config = load_config(None, [
        "dataset.phantoms=3", "dataset.phantom_shape=[24,48,48]", "dataset.patch_size=[16,32,32]",
        "dataset.patches_per_volume=2", "training.batch_size=2", "training.max_steps=2",
        "training.checkpoint_every=2", "training.validate_every=2", "training.val_max_volumes=1",
        f"training.output_dir={out}",
    ])  # fmt: skip
    assert validation_patch(config, (24, 48, 48)) == (16, 32, 32)
    result = train(config)
    exported = CTPAReconstructionPipeline.from_pretrained(result.final_dir)
    exported.set_progress_bar_config(disable=True)
    assert exported.vqgan.config.inference_patch_size == [16, 32, 32]
    hu = np.asarray(VolumeStore.from_disk(out / "phantom_dataset", "validation").volume(0))
    expected = psnr_hu(exported(hu, patch_size=(16, 32, 32), overlap=0.25).reconstruction, hu)
    with (out / "metrics.csv").open() as f:
        logged = [float(row["val_psnr"]) for row in csv.DictReader(f) if row.get("val_psnr")]
    assert logged[-1] == pytest.approx(expected, abs=1e-5)
    planned = psnr_hu(exported(hu, patch_size="planned").reconstruction, hu)
    assert planned != pytest.approx(expected, abs=1e-5)  # the check above could tell the two grids apart
