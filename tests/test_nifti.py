"""NIfTI in/out: canonical orientation, exact write-back, and clear errors for bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from ctpa_vq.data.nifti import CTFileError, ct_from_image, load_ct, save_ct_like

# Source axes (i, j, k) -> world: i runs posterior (-A), j runs inferior (-S), k runs right (+R).
# An LPS-like, axis-permuted affine with unequal spacing and an offset.
PERMUTED_AFFINE = np.array(
    [
        [0.0, 0.0, 0.8, -40.0],
        [-0.6, 0.0, 0.0, 25.0],
        [0.0, -2.5, 0.0, 100.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _random_hu(shape, seed=0):
    return np.random.default_rng(seed).integers(-1024, 3000, shape).astype(np.int16)


def _write(path, data, affine=PERMUTED_AFFINE, **header):
    image = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        image.header[key] = value
    nib.save(image, path)
    return path


def test_load_is_canonical_and_voxels_keep_their_world_position(tmp_path):
    source = _random_hu((7, 9, 11))
    volume = load_ct(_write(tmp_path / "ct.nii.gz", source))

    assert volume.hu.dtype == np.int16
    assert volume.hu.flags.c_contiguous
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    # (i, j, k) of shape (7, 9, 11) runs (-A, -S, +R): canonical (D, H, W) = (S, A, R) = (9, 7, 11)
    assert volume.shape == (9, 7, 11)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.6, 0.8), rtol=1e-6)
    rng = np.random.default_rng(1)
    for i, j, k in zip(rng.integers(0, 7, 20), rng.integers(0, 9, 20), rng.integers(0, 11, 20)):
        world = PERMUTED_AFFINE @ [i, j, k, 1]
        x, y, z = np.rint(np.linalg.solve(volume.affine, world)[:3]).astype(int)
        assert volume.hu[z, y, x] == source[i, j, k]


def test_load_of_the_permuted_affine_gives_the_hand_derived_canonical_volume(tmp_path):
    """PERMUTED_AFFINE by hand: W (+R) is the source's k, H (+A) its i reversed, D (+S) its j reversed."""
    data = _random_hu((6, 5, 4))
    volume = load_ct(_write(tmp_path / "ct.nii", data))
    np.testing.assert_array_equal(volume.hu, data[::-1, ::-1, :].transpose(1, 0, 2))
    # voxel (x, y, z) = source (i, j, k) = (5 - y, 4 - z, x): R = 0.8 x - 40, A = 0.6 y + 25 - 0.6 * 5,
    # S = 2.5 z + 100 - 2.5 * 4
    np.testing.assert_allclose(volume.affine, [[0.8, 0, 0, -40.0], [0, 0.6, 0, 22.0], [0, 0, 2.5, 90.0], [0, 0, 0, 1]])
    assert volume.spacing == pytest.approx((2.5, 0.6, 0.8))


def test_save_like_inverts_the_canonical_transform_and_keeps_the_header(tmp_path):
    source = _random_hu((7, 9, 11))
    path = _write(tmp_path / "in.nii.gz", source, descrip=b"scanner X")
    volume = load_ct(path)

    out = save_ct_like(volume.hu, volume, tmp_path / "out.nii.gz")
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), source)
    assert written.get_data_dtype() == np.int16
    np.testing.assert_allclose(written.affine, PERMUTED_AFFINE, atol=1e-5)
    assert written.header["descrip"] == b"scanner X"
    assert written.header.get_sform(coded=True)[1] == nib.load(path).header.get_sform(coded=True)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "out.nii.gz"]  # no temp files left


def test_save_like_writes_float32_for_non_integral_values(tmp_path):
    volume = load_ct(_write(tmp_path / "in.nii", _random_hu((4, 5, 6))))
    values = volume.hu.astype(np.float32) + 0.25
    written = nib.load(save_ct_like(values, volume, tmp_path / "out.nii"))
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(load_ct(tmp_path / "out.nii").hu, values)


def test_save_like_rejects_a_wrong_shape_and_leaves_nothing(tmp_path):
    volume = load_ct(_write(tmp_path / "in.nii", _random_hu((4, 5, 6))))
    with pytest.raises(ValueError, match="shape"):
        save_ct_like(np.zeros((2, 2, 2), np.int16), volume, tmp_path / "out.nii")
    assert not (tmp_path / "out.nii").exists()


def test_scaled_unsigned_data_becomes_int16_hu(tmp_path):
    raw = np.random.default_rng(0).integers(0, 4000, (5, 6, 7)).astype(np.uint16)
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = load_ct(tmp_path / "scaled.nii")
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, (raw.astype(np.int32) - 1024).transpose(2, 1, 0))


def test_4d_with_one_volume_is_accepted(tmp_path):
    source = _random_hu((4, 5, 6))
    volume = load_ct(_write(tmp_path / "one.nii", source[..., None], affine=np.eye(4)))
    np.testing.assert_array_equal(volume.hu, source.transpose(2, 1, 0))
    out = nib.load(save_ct_like(volume.hu, volume, tmp_path / "out.nii"))
    assert out.shape == (4, 5, 6, 1)


def test_in_memory_image(tmp_path):
    source = _random_hu((4, 5, 6))
    volume = ct_from_image(nib.Nifti1Image(source, PERMUTED_AFFINE), "memory")
    assert volume.name == "memory" and volume.shape == (5, 4, 6)


def _singular(tmp_path, name):
    """sform with a zero column (nibabel refuses to build a qform from it, so qform is off)."""
    image = nib.Nifti1Image(_random_hu((4, 4, 4)), None)
    image.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / name)
    return tmp_path / name


def _truncated(tmp_path, name):
    good = _write(tmp_path / f"good_{name}", _random_hu((20, 20, 20)))
    data = good.read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _corrupt(tmp_path, name):
    """Compressible voxels whose deflate stream is garbage from the middle on: an invalid code for the decoder."""
    good = _write(tmp_path / f"good_{name}", np.tile(np.arange(-1000, 1000, 50, dtype=np.int16), (20, 20, 1)))
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    bad = tmp_path / name
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize(
    "name, make, problem",
    [
        ("truncated.nii.gz", lambda p, n: _truncated(p, n), "truncated or corrupt"),
        ("corrupt.nii.gz", _corrupt, "truncated or corrupt"),
        ("truncated.nii", lambda p, n: _truncated(p, n), "truncated or corrupt"),
        ("flat.nii.gz", lambda p, n: _write(p / n, _random_hu((8, 8))), "is 2D"),
        ("slice.nii.gz", lambda p, n: _write(p / n, _random_hu((8, 8, 1))), "single slice"),
        ("series.nii.gz", lambda p, n: _write(p / n, _random_hu((4, 4, 4, 3))), "4D with 3 volumes"),
        ("nan.nii.gz", lambda p, n: _write(p / n, np.full((4, 4, 4), np.nan, np.float32)), "NaN or Inf"),
        ("singular.nii.gz", _singular, "unknown orientation"),
        ("junk.nii.gz", lambda p, n: (p / n).write_bytes(gzip.compress(b"not a nifti")) and p / n, "not a readable NIfTI"),
    ],
)
def test_bad_files_raise_errors_naming_the_file(tmp_path, name, make, problem):
    path = make(tmp_path, name)
    with pytest.raises(CTFileError, match=problem) as info:
        load_ct(path)
    assert name in str(info.value)
    assert info.value.name == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_ct(tmp_path / "missing.nii.gz")


def test_a_gzipped_volume_reads_as_nibabel_reads_it(tmp_path):
    """`.nii.gz` voxels come through ISA-L's decoder: the same values as nibabel's own reader, canonical."""
    hu = _random_hu((30, 20, 10))
    path = _write(tmp_path / "scan.nii.gz", hu)
    expected = np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(load_ct(path).hu, expected)
