"""The CLI as a new user meets it: every mistake gets one line naming the thing and the problem,
an exit code, and no traceback; what can still be done is done."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from ctpa_vq.cli import main
from ctpa_vq.data.phantom import write_phantom_nifti

FAST = ["--patch", "8", "16", "16", "--batch-size", "8", "--no-progress"]


@pytest.fixture
def volume(tmp_path):
    return write_phantom_nifti(tmp_path / "ct.nii.gz", (12, 16, 16), seed=1)


def _cli(capsys, *args):
    """Run the command as the console script does; an escaping exception (a traceback) fails the test."""
    rc = main([str(a) for a in args])
    printed = capsys.readouterr()
    return rc, printed.err


def test_model_folder_without_its_safetensors(model_dir, volume, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    rc, err = _cli(capsys, "reconstruct", "--model", broken, "--input", volume, "--output", tmp_path / "o.nii.gz",
                   *FAST)
    assert rc == 2 and ".bin" not in err
    assert f"{broken}: no weights in this model folder (no .safetensors file" in err


def test_truncated_safetensors_is_named(model_dir, volume, tmp_path, capsys):
    broken = tmp_path / "torn"
    broken.mkdir()
    for file in model_dir.iterdir():
        data = file.read_bytes()
        (broken / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    rc, err = _cli(capsys, "reconstruct", "--model", broken, "--input", volume, "--output", tmp_path / "o.nii.gz",
                   *FAST)
    assert rc == 2
    assert f"{broken}: the model cannot be loaded" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(model_dir, volume, tmp_path, capsys):
    rc, err = _cli(capsys, "reconstruct", "--model", model_dir, "--input", volume, "--output", tmp_path / "o.nii.gz",
                   "--device", "cuda", *FAST)
    assert rc == 2
    assert "--device cuda: CUDA is not available" in err and "use --device cpu" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_bad_device_name(model_dir, volume, tmp_path, capsys):
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(volume), "--output",
                 str(tmp_path / "o.nii.gz"), "--device", "gpu0", *FAST]) == 2
    assert "--device gpu0: not a torch device" in capsys.readouterr().err


def test_thin_volume_is_written_and_scored_with_what_applies(model_dir, tmp_path, capsys):
    thin = tmp_path / "thin.nii.gz"
    data = np.random.default_rng(0).integers(-1000, 1000, (64, 64, 5)).astype(np.int16)  # 5 slices
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0])), thin)
    out = tmp_path / "out.nii.gz"
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(thin), "--output", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: PSNR" in printed
    assert "SSIM not computed: 3D SSIM needs more than 5 voxels along every axis, this volume is 5x64x64" in printed
    assert nib.load(out).shape == (64, 64, 5)


def test_reconstruct_refuses_to_overwrite_without_overwrite(model_dir, volume, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"precious")
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(volume), "--output", str(out), *FAST]) == 2
    assert f"{out}: already exists (choose another output, or pass --overwrite)" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["reconstruct", "--model", str(model_dir), "--input", str(volume), "--output", str(out),
                 "--overwrite", *FAST]) == 0
    assert nib.load(out).shape == (16, 16, 12)


def test_evaluate_scores_the_rest_and_lists_unreadable_files(model_dir, tmp_path, capsys):
    folder = tmp_path / "scans"
    for seed in range(2):
        write_phantom_nifti(folder / f"good{seed}.nii.gz", (12, 16, 16), seed=seed)
    good = (folder / "good0.nii.gz").read_bytes()
    (folder / "a_truncated.nii.gz").write_bytes(good[: len(good) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), folder / "flat.nii.gz")
    out_csv = tmp_path / "scores.csv"

    rc = main(["evaluate", "--model", str(model_dir), "--input", str(folder), "--csv", str(out_csv),
               "--keep-identifiers", *FAST])
    printed = capsys.readouterr()
    assert rc == 1
    assert [row["name"] for row in csv.DictReader(out_csv.open())] == ["good0.nii.gz", "good1.nii.gz"]
    assert "mean over 2 volumes" in printed.out
    assert "2 volume(s) could not be scored" in printed.err
    assert f"{folder / 'a_truncated.nii.gz'}: voxel data cannot be read: file truncated or corrupt" in printed.err
    assert f"{folder / 'flat.nii.gz'}: is 2D" in printed.err


def test_any_other_error_is_one_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: [unclosed\n")  # a YAML parser error: neither ValueError nor FileNotFoundError
    monkeypatch.delenv("CTPA_VQ_DEBUG", raising=False)
    assert main(["verify", "--config", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ctpa-vq verify: error: ParserError:") and str(recipe) in err
    assert "set CTPA_VQ_DEBUG=1 for the traceback" in err
    monkeypatch.setenv("CTPA_VQ_DEBUG", "1")
    with pytest.raises(Exception, match="while parsing"):
        main(["verify", "--config", str(recipe)])
