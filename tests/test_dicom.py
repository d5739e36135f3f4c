"""DICOM series, NRRD and MetaImage in: real files written with pydicom / SimpleITK from phantoms.

Each bad case is refused with the series folder (or slice file) and the problem named.
"""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage

from ctpa_vq.data.dicom import SkippedSeries
from ctpa_vq.data.nifti import CTFileError
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.data.volume_io import find_volumes, load_volume, save_volume_like

from dicom_series import expected_affine, make_undecodable, oblique_orientation, write_series

SLICES = make_phantom((7, 20, 24), seed=4)  # (slices, rows, columns)


def _source_layout(volume):
    """The volume's voxels in the file's own (i, j, k) = (column, row, slice) layout."""
    return volume.to_source_orientation(volume.hu)


def test_series_is_ordered_by_position_and_keeps_its_geometry(tmp_path):
    files = write_series(tmp_path / "s", SLICES, orientation=oblique_orientation(), pixel_spacing=(0.7, 0.8))
    volume = load_volume(tmp_path / "s")

    np.testing.assert_allclose(volume.source_affine, expected_affine(files), atol=1e-6)
    np.testing.assert_array_equal(_source_layout(volume), SLICES.transpose(2, 1, 0))
    assert volume.hu.dtype == np.int16
    assert sorted(volume.spacing) == pytest.approx(sorted((2.5, 0.7, 0.8)), abs=1e-5)
    # World position of a voxel: the DICOM position of that pixel, in RAS.
    ds = pydicom.dcmread(sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[0])
    corner_lps = np.array(ds.ImagePositionPatient, dtype=float)
    np.testing.assert_allclose(volume.source_affine[:3, 3], corner_lps * [-1, -1, 1], atol=1e-6)


def test_rescale_slope_and_intercept_give_hu(tmp_path):
    hu = (SLICES // 2) * 2  # even HU: exact with slope 2
    write_series(tmp_path / "int", hu, slope=2.0, intercept=-4096.0)
    np.testing.assert_array_equal(_source_layout(load_volume(tmp_path / "int")), hu.transpose(2, 1, 0))

    fractional = SLICES.astype(np.float64) * 0.5  # stored = hu / 0.25 + 8192: HU in quarter steps
    write_series(tmp_path / "float", fractional, slope=0.25, intercept=-2048.0)
    volume = load_volume(tmp_path / "float")
    assert volume.hu.dtype == np.float32
    np.testing.assert_allclose(_source_layout(volume), fractional.transpose(2, 1, 0), atol=1e-4)


def test_hu_beyond_int16_in_one_slice_are_kept_exactly(tmp_path):
    """Slope 1, a negative intercept (the usual case): a metal slice reaching 38000 HU no longer fits int16,
    so the volume widens from that slice on instead of wrapping; a slice reaching 32767 still fits."""
    hu = SLICES.astype(np.int32)
    hu[3, 5, 7] = 38000  # stored 41072 - 3072: above int16
    hu[1, 0, 0] = 32767  # the top of int16 exactly, in another slice
    write_series(tmp_path / "metal", hu)  # intercept -3072
    volume = load_volume(tmp_path / "metal")
    np.testing.assert_array_equal(_source_layout(volume), hu.transpose(2, 1, 0))
    assert volume.hu.max() == 38000


def test_rle_compressed_series_is_decoded(tmp_path):
    files = write_series(tmp_path / "rle", SLICES)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
    np.testing.assert_array_equal(_source_layout(load_volume(tmp_path / "rle")), SLICES.transpose(2, 1, 0))


@pytest.mark.parametrize(
    "case, make, message",
    [
        ("gap", lambda f: write_series(f, SLICES[:6], steps=[2.5, 2.5, 5.0, 2.5, 2.5]),
         r"missing slices: a gap of 5\.000 mm between slice\d+\.dcm and slice\d+\.dcm where the slice spacing is "
         r"2\.500 mm \(about 1 slice\(s\) missing\)"),
        ("uneven", lambda f: write_series(f, SLICES[:5], steps=[2.5, 2.5, 3.0, 2.5]),
         r"non-uniform slice spacing: steps from 2\.500 to 3\.000 mm"),
        ("tilt_tag", lambda f: write_series(f, SLICES[:4], gantry_tilt=12.0), r"gantry tilt of 12 degrees"),
        ("sheared", lambda f: _sheared(f), r"gantry tilt: slice positions drift 0\.2\d\d mm sideways per mm"),
        ("mixed", lambda f: _mixed_orientations(f),
         r"mixed orientations: (other|slice)\d+\.dcm has ImageOrientationPatient \[.*\] but (other|slice)\d+\.dcm "
         r"has \[.*\]"),
        ("single", lambda f: write_series(f, SLICES[:1]), r"a single 2D slice \(slice000\.dcm\)"),
        ("sizes", lambda f: _mixed_sizes(f),
         r"slices differ in size: (other|slice)\d+\.dcm is \(\d+, \d+\) pixels of \(0\.7, 0\.8\) mm, "),
        ("duplicate", lambda f: _duplicate(f), r"two slices at the same position"),
    ],
)
def test_bad_series_are_refused_naming_the_folder_and_problem(tmp_path, case, make, message):
    folder = tmp_path / case
    make(folder)
    with pytest.raises(CTFileError, match=message) as caught:
        load_volume(folder)
    assert str(caught.value).startswith(str(folder))


def _sheared(folder):
    """Positions drift sideways (along the rows) as they advance: a tilted gantry without the tag."""
    write_series(folder, SLICES[:4], shuffle=False)
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1] + 0.55 * k, position[2]]
        ds.save_as(path, enforce_file_format=True)


def _mixed_orientations(folder):
    files = write_series(folder, SLICES[:4])
    row, column = oblique_orientation()
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    write_series(folder, SLICES[4:6], orientation=(row, column), origin=(-120.0, -95.0, 330.0), series_uid=uid,
                 file_prefix="other")


def _mixed_sizes(folder):
    files = write_series(folder, SLICES[:3])
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    write_series(folder, SLICES[3:4, :16], origin=(-120.0, -95.0, 317.5), series_uid=uid, file_prefix="other")


def _duplicate(folder):
    files = write_series(folder, SLICES[:4], shuffle=False)
    ds = pydicom.dcmread(files[1])
    ds.ImagePositionPatient = pydicom.dcmread(files[2]).ImagePositionPatient
    ds.save_as(files[1], enforce_file_format=True)


def test_undecodable_compressed_slice_is_named(tmp_path):
    """JPEG 2000 has a decoder wherever Pillow has OpenJPEG; a damaged codestream still gets a message."""
    files = write_series(tmp_path / "j2k", SLICES[:4], shuffle=False)
    make_undecodable(files[2])
    message = (r"slice002\.dcm: pixel data in the compressed transfer syntax 'JPEG 2000 Image Compression "
               r"\(Lossless Only\)' \(1\.2\.840\.10008\.1\.2\.4\.90\) cannot be decoded: "
               r"(no decoder for it is installed|the installed decoders failed \(.+\): damaged pixel data\?)")
    with pytest.raises(CTFileError, match=message):
        load_volume(tmp_path / "j2k")


@pytest.mark.skipif(get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed here")
def test_compressed_syntax_without_a_decoder_says_what_to_install(tmp_path):
    files = write_series(tmp_path / "jls", SLICES[:4], shuffle=False)
    make_undecodable(files[1], JPEGLSLossless)
    message = (r"slice001\.dcm: pixel data in the compressed transfer syntax 'JPEG-LS Lossless Image Compression' "
               r"\(1\.2\.840\.10008\.1\.2\.4\.80\) cannot be decoded: no decoder for it is installed "
               r"\(install one of: gdcm.*pylibjpeg")
    with pytest.raises(CTFileError, match=message):
        load_volume(tmp_path / "jls")


def test_unreadable_slice_file_is_named(tmp_path):
    files = write_series(tmp_path / "s", SLICES[:4], shuffle=False)
    files[1].write_bytes(files[1].read_bytes()[:200])  # preamble and a torn header
    with pytest.raises(CTFileError, match=r"slice001\.dcm: lacks SeriesInstanceUID: a damaged or incomplete DICOM"):
        load_volume(tmp_path / "s")


def test_several_series_in_one_folder(tmp_path):
    folder = tmp_path / "study"
    write_series(folder, SLICES, series_number=3, file_prefix="a")
    write_series(folder, SLICES[:5] + 100, series_number=2, file_prefix="b")
    write_series(folder, SLICES[:2], series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), file_prefix="c")
    write_series(folder, SLICES[:3], series_number=4, sop_class=SecondaryCaptureImageStorage, file_prefix="d")
    write_series(folder, SLICES[:3], series_number=5, image_type=("DERIVED", "SECONDARY", "MPR"), file_prefix="e")

    with pytest.raises(CTFileError, match=rf"(?s){folder}: holds 2 CT series; pass a folder with one series.*"
                                          rf"{folder}#2: 5 file\(s\).*{folder}#3: 7 file\(s\)"):
        load_volume(folder)

    sources = find_volumes(tmp_path)
    assert [s.name for s in sources] == [f"{folder}#{k}" for k in range(1, 6)]
    outcomes = {}
    for source in sources:
        try:
            outcomes[source.name] = source.load().shape
        except SkippedSeries as err:
            outcomes[source.name] = str(err)
    assert outcomes[f"{folder}#1"] == f"{folder}#1: a localizer (scout) series, not a CT volume"
    assert outcomes[f"{folder}#2"] == (5, 20, 24)
    assert outcomes[f"{folder}#3"] == (7, 20, 24)
    assert outcomes[f"{folder}#4"] == f"{folder}#4: a secondary capture (screenshot), not a CT volume"
    assert outcomes[f"{folder}#5"] == (f"{folder}#5: a derived image series (ImageType DERIVED/SECONDARY/MPR), "
                                       "not original CT")


def test_a_single_dicom_file_and_unknown_formats_are_refused(tmp_path):
    files = write_series(tmp_path / "s", SLICES[:3])
    with pytest.raises(CTFileError, match="a single DICOM file is one 2D slice: pass the folder"):
        load_volume(files[0])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CTFileError, match=r"notes\.txt: unknown format: expected \.nii"):
        load_volume(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTFileError, match="empty: no DICOM files in this folder"):
        load_volume(tmp_path / "empty")


def _itk_image(data_zyx, spacing, origin, direction):
    image = sitk.GetImageFromArray(data_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


# A rotation about z (LPS) and a flip of the third axis: neither canonical nor axis-aligned.
_C, _S = np.cos(0.3), np.sin(0.3)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_metaimage_keep_geometry_and_round_trip(tmp_path, suffix):
    data = make_phantom((9, 12, 14), seed=5)  # ITK array order (z, y, x)
    spacing, origin = (0.8, 0.6, 2.0), (10.0, -20.0, 30.0)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(_itk_image(data, spacing, origin, DIRECTION), str(path), True)

    volume = load_volume(path)
    # Independent expectation: ITK's index -> LPS mapping, turned to RAS.
    lps = np.eye(4)
    lps[:3, :3] = np.array(DIRECTION).reshape(3, 3) @ np.diag(spacing)
    lps[:3, 3] = origin
    np.testing.assert_allclose(volume.source_affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-9)
    np.testing.assert_array_equal(_source_layout(volume), data.transpose(2, 1, 0))

    out = tmp_path / f"out{suffix}"
    save_volume_like(volume.hu + 1, volume, out)
    written = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), data + 1)
    np.testing.assert_allclose(written.GetSpacing(), spacing)
    np.testing.assert_allclose(written.GetOrigin(), origin)
    np.testing.assert_allclose(written.GetDirection(), DIRECTION, atol=1e-12)


def test_itk_2d_and_vector_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(CTFileError, match=r"flat\.nrrd: is a single 2D slice"):
        load_volume(tmp_path / "flat.nrrd")
    rgb = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(CTFileError, match=r"rgb\.mha: has 3 values per voxel"):
        load_volume(tmp_path / "rgb.mha")
    (tmp_path / "torn.nrrd").write_bytes(b"NRRD0004\ntype: short\n")
    with pytest.raises(CTFileError, match=r"torn\.nrrd: not a readable NRRD/MetaImage file"):
        load_volume(tmp_path / "torn.nrrd")


def test_nifti_output_of_a_dicom_series_is_on_its_grid(tmp_path):
    files = write_series(tmp_path / "s", SLICES, orientation=oblique_orientation())
    volume = load_volume(tmp_path / "s")
    save_volume_like(volume.hu, volume, tmp_path / "out.nii.gz")
    written = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_allclose(written.affine, expected_affine(files), atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), SLICES.transpose(2, 1, 0))


def test_a_dicomdir_is_not_taken_for_a_slice(tmp_path):
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for path in write_series(tmp_path / "export", SLICES):
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "cd")  # DICOMDIR at the root, the slices in PT*/ST*/SE*/
    sources = find_volumes(tmp_path / "cd")
    assert len(sources) == 1 and "SE" in sources[0].name
    np.testing.assert_array_equal(_source_layout(sources[0].load()), SLICES.transpose(2, 1, 0))


def _dicom_series(tmp_path):
    write_series(tmp_path / "series", np.zeros((3, 8, 8), np.int16))
    return tmp_path / "series"


def _nrrd_file(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16)), str(tmp_path / "ct.nrrd"))
    return tmp_path / "ct.nrrd"


@pytest.mark.parametrize(
    ("module", "make_input", "kind"),
    [("pydicom", _dicom_series, "DICOM"), ("SimpleITK", _nrrd_file, "NRRD/MetaImage")],
)
def test_a_missing_reader_extra_names_the_format_and_the_install(tmp_path, monkeypatch, module, make_input, kind):
    """Without the optional `clinical` extra (the module cannot be imported), reading says what to install."""
    path = make_input(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(CTFileError) as caught:
        load_volume(path)
    message = str(caught.value)
    assert message.startswith(f"{kind}: ") and f"needs {module}" in message, message
    assert "pip install 'ctpa-vq[clinical]'" in message, message


@pytest.mark.parametrize("signed", [False, True])
def test_uncompressed_slices_read_as_pydicom_reads_them(tmp_path, signed):
    """The fast path for native 16-bit slices gives pydicom's ``pixel_array``, also with BitsStored 12 and
    junk in the unused high bits (cleared when unsigned, sign-extended when signed, as pydicom does)."""
    from ctpa_vq.data.dicom import _native_pixels

    files = write_series(tmp_path / "s", SLICES[:3])
    rng = np.random.default_rng(0)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        raw = rng.integers(0, 65536, size=(ds.Rows, ds.Columns), dtype=np.uint16)
        ds.PixelData = raw.tobytes()
        ds.save_as(path, enforce_file_format=True)
        ds = pydicom.dcmread(path)
        fast = _native_pixels(path, ds, ds.file_meta.TransferSyntaxUID)
        assert fast is not None and fast.dtype == ds.pixel_array.dtype
        np.testing.assert_array_equal(fast, ds.pixel_array)


@pytest.mark.parametrize("cut", [1000, 20])  # most of the pixel data gone (pydicom drops it), or its end
def test_a_slice_cut_short_in_its_pixel_data_is_named(tmp_path, cut):
    """A slice file truncated inside its pixel data (a copy that stopped) is refused, naming that file."""
    files = write_series(tmp_path / "s", SLICES)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - cut])
    with pytest.raises(CTFileError) as caught:
        load_volume(tmp_path / "s")
    assert str(files[2]) in str(caught.value) and "truncated" in str(caught.value), str(caught.value)


def test_a_big_endian_series_reads_its_header_and_pixels_as_pydicom_does(tmp_path):
    """Header tags are decoded from their raw bytes in the file's own byte order (Rows = 0x0010 would be
    0x1000 read the other way round); the pixels of the retired big-endian syntax go through pydicom."""
    from pydicom.uid import ExplicitVRBigEndian

    files = write_series(tmp_path / "s", SLICES[:3])
    expected = []
    for path in files:
        ds = pydicom.dcmread(path)
        expected.append(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        ds.PixelData = ds.pixel_array.astype(">u2" if ds.PixelRepresentation == 0 else ">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        pydicom.dcmwrite(path, ds, enforce_file_format=True)  # the encoding of the new transfer syntax
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    ct = load_volume(tmp_path / "s")
    assert ct.hu.shape == (3, *SLICES.shape[1:])
    np.testing.assert_array_equal(np.sort(ct.hu.ravel()), np.sort(np.stack(expected).ravel()))
