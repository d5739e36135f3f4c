"""`ctpa-vq reconstruct`: NIfTI in -> NIfTI out in the input's own geometry; bad input fails cleanly."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ctpa_vq.cli import main
from ctpa_vq.data.nifti import load_ct
from ctpa_vq.pipelines import load_reconstruction_pipeline

# Source axes: i -> -y (posterior), j -> +z, k -> -x: neither canonical nor a pure flip.
NON_CANONICAL_AFFINE = np.array(
    [[0.0, 0.0, -0.8, 40.0], [-0.7, 0.0, 0.0, 30.0], [0.0, 2.5, 0.0, -60.0], [0.0, 0.0, 0.0, 1.0]]
)
FAST = ["--patch", "8", "16", "16", "--batch-size", "8", "--no-progress"]


def _write(path, data, affine=NON_CANONICAL_AFFINE):
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    nib.save(image, path)
    return path


def _ct_data(shape=(18, 10, 14), seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def test_reconstruct_keeps_geometry_and_prints_metrics(model_dir, tmp_path, capsys):
    source = _write(tmp_path / "in.nii.gz", _ct_data())
    out, png = tmp_path / "out.nii.gz", tmp_path / "slices.png"
    args = ["reconstruct", "--model", str(model_dir), "--input", str(source), "--output", str(out)]
    args += ["--slices", str(png)]
    assert main(args + FAST) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "SSIM" in printed and "dB" in printed

    written, original = nib.load(out), nib.load(source)
    assert written.shape == original.shape == (18, 10, 14)
    np.testing.assert_allclose(written.affine, NON_CANONICAL_AFFINE)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    np.testing.assert_allclose(written.header.get_zooms(), original.header.get_zooms())
    assert written.get_data_dtype() == np.int16

    # Voxel for voxel: the pipeline's canonical result mapped back to the file's own layout.
    ct = load_ct(source)
    pipeline = load_reconstruction_pipeline(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    expected = np.rint(pipeline(ct.hu, patch_size=(8, 16, 16), batch_size=8).reconstruction).astype(np.int16)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), ct.to_source_orientation(expected))

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 3 * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "out.nii.gz", "slices.png"]


def _four_d(path):
    return _write(path, np.zeros((8, 8, 8, 3), dtype=np.int16))


def _nan(path):
    data = _ct_data().astype(np.float32)
    data[3, 4, 5] = np.nan
    return _write(path, data)


def _truncated(path):
    _write(path, _ct_data())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((EOFError, OSError)):  # it really is a broken gzip stream
        gzip.decompress(path.read_bytes())
    return path


def _missing(path):
    return path


@pytest.mark.parametrize("make_input, problem", [
    (_four_d, "4D"), (_nan, "NaN"), (_truncated, "truncated"), (_missing, "no such file"),
])
def test_bad_input_fails_with_one_line_and_leaves_no_output(model_dir, tmp_path, capsys, make_input, problem):
    source = make_input(tmp_path / "bad.nii.gz")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.nii.gz"
    code = main(["reconstruct", "--model", str(model_dir), "--input", str(source), "--output", str(out)] + FAST)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "bad.nii.gz" in err and problem in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_console_script_exit_code(model_dir, tmp_path):
    source = _truncated(tmp_path / "broken.nii.gz")
    out = tmp_path / "out.nii.gz"
    result = subprocess.run(
        [sys.executable, "-m", "ctpa_vq.cli", "reconstruct", "--model", str(model_dir), "--input", str(source),
         "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "broken.nii.gz" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_model_and_output_arguments(model_dir, tmp_path, capsys):
    source = _write(tmp_path / "in.nii.gz", _ct_data())
    base = ["reconstruct", "--input", str(source)] + FAST
    assert main(base + ["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(base + ["--model", str(model_dir), "--output", str(tmp_path / "o.png")]) == 2
    assert main(base + ["--model", str(model_dir), "--output", str(source)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]


def test_default_grid_is_planned_and_printed(model_dir, tmp_path, capsys):
    """Without --patch the grid is planned per volume and the plan printed; --max-patch-voxels
    bounds the patch and gives the same result as the pipeline with that budget."""
    source = _write(tmp_path / "in.nii.gz", _ct_data((30, 20, 24)))
    ct = load_ct(source)
    base = ["reconstruct", "--model", str(model_dir), "--input", str(source), "--no-progress"]
    assert main(base + ["--output", str(tmp_path / "one.nii.gz")]) == 0
    one_patch = f"1 x 1 x 1 = 1 patches of {' x '.join(str(-(-n // 4) * 4) for n in ct.hu.shape)} voxels"
    assert one_patch in capsys.readouterr().out

    assert main(base + ["--output", str(tmp_path / "many.nii.gz"), "--max-patch-voxels", "10000"]) == 0
    printed = capsys.readouterr().out
    assert "patch grid" in printed and "x the volume's voxels" in printed and one_patch not in printed
    pipeline = load_reconstruction_pipeline(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    grid = pipeline.patch_grid(ct.hu.shape, max_patch_voxels=10000)
    assert len(grid) > 1 and grid.describe() in printed
    expected = np.rint(pipeline(ct.hu, max_patch_voxels=10000).reconstruction).astype(np.int16)
    written = np.asanyarray(nib.load(tmp_path / "many.nii.gz").dataobj)
    np.testing.assert_array_equal(written, ct.to_source_orientation(expected))


def test_no_metrics_skips_scoring_and_the_time_split_is_printed(model_dir, tmp_path, capsys):
    source = _write(tmp_path / "in.nii.gz", _ct_data())
    base = ["reconstruct", "--model", str(model_dir), "--input", str(source), *FAST]
    assert main(base + ["--output", str(tmp_path / "scored.nii.gz")]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "time: reconstruction" in printed and "scoring" in printed
    assert main(base + ["--output", str(tmp_path / "unscored.nii.gz"), "--no-metrics"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" not in printed and "SSIM" not in printed and "scoring skipped" in printed
    np.testing.assert_array_equal(nib.load(tmp_path / "unscored.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "scored.nii.gz").get_fdata())
