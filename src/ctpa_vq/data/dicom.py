"""DICOM CT series (a folder of single-frame slices) -> :class:`~ctpa_vq.data.nifti.CTVolume`.

Read with pydicom (an optional extra: ``pip install 'ctpa-vq[clinical]'``). A series becomes a
volume only if it is one regular 3D grid; anything else is refused with the file and the problem,
never silently resampled:

* slices are ordered by their position along the slice normal (ImageOrientationPatient's row x
  column directions), not by file name or InstanceNumber;
* HU = stored value * RescaleSlope + RescaleIntercept, per slice;
* the affine comes from ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM's
  LPS turned into NIfTI's RAS), with the slice step measured between the first and last slice;
* refused: one slice, missing slices (a gap in the positions), non-uniform slice spacing, gantry
  tilt (a GantryDetectorTilt, or positions that drift sideways), mixed orientations or slice sizes,
  multi-frame files, and pixel data in a compressed transfer syntax pydicom cannot decode here;
* skipped with a reason: localizers (scouts), secondary captures, derived images, non-CT series.

Only geometry and rescale tags are read into the volume; no other tag (names, dates, UIDs,
descriptions) is copied anywhere. The SeriesInstanceUID only groups files; it is not kept.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from .nifti import LPS_TO_RAS, CTFileError, CTVolume, ct_from_image, source_layout

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_HEADER_TAGS = ["SeriesInstanceUID", "SeriesNumber", "Modality", "ImageType", "SOPClassUID", "StudyInstanceUID",
                "ImageOrientationPatient", "SliceThickness"]
_ORIENTATION_TOLERANCE = 1e-4  # direction cosines
_SPACING_TOLERANCE = 0.01  # relative deviation of a slice step from the median step
_GAP_FACTOR = 1.5  # a step this many times the median step means slices are missing
_STORED_INT16 = np.iinfo(np.int16)
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR little endian
_SHEAR_TOLERANCE = 1e-3  # in-plane drift per mm along the normal (tan of ~0.06 degrees)


class SkippedSeries(CTFileError):
    """A series that is not a CT volume to read (localizer, secondary capture, derived, not CT)."""


@dataclass
class DicomSeries:
    """The DICOM files of one series in a folder.

    Attributes:
        name: the folder, with ``#k`` (1-based, by SeriesNumber) when it holds several series.
        files: the series' files (unordered; :func:`load_dicom_series` orders them).
        skip_reason: why this series is not a CT volume to read (localizer, ...), or None.
        error: why it cannot be read although it should be (an unreadable file), or None.
        study: the StudyInstanceUID (only to group a study's series; never stored), or "".
        normal: the slice normal (row x column direction cosines, LPS) of its first file, or None.
        slice_thickness: SliceThickness of its first file in mm, or None.
        slices: the files already read whole (pydicom datasets, aligned with ``files``), or None.
    """

    name: str
    files: list[Path]
    skip_reason: str | None = None
    error: str | None = None
    study: str = ""
    normal: tuple[float, float, float] | None = None
    slice_thickness: float | None = None
    slices: list | None = field(default=None, repr=False)


def _pydicom():
    try:
        import pydicom
    except ImportError as err:
        raise CTFileError("DICOM", "reading DICOM needs pydicom: pip install 'ctpa-vq[clinical]'") from err
    return pydicom


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def find_series(folder: str | os.PathLike, files: list[Path] | None = None, read_whole: bool = False
                ) -> list[DicomSeries]:
    """The series among ``files`` (default: the DICOM files directly in ``folder``), sorted by SeriesNumber.

    A file whose header cannot be read becomes a one-file series with that problem as its
    ``error``, so the rest of the folder is still read. A DICOMDIR (a CD's index) is ignored.
    ``read_whole``: read each file whole, once, and keep it in the series (``slices``) for
    :func:`load_dicom_series`, instead of its header now and the whole file again when loaded
    (memory: the folder's files until they are loaded).
    """
    pydicom = _pydicom()
    folder = Path(folder)
    if files is None:
        files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    groups: dict[str, list[Path]] = {}
    headers = {}
    whole = {}
    broken = []
    for path in files:
        try:
            if read_whole:
                header = whole[path] = pydicom.dcmread(path)
            else:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except Exception as err:  # pydicom raises many types for damaged files
            broken.append(DicomSeries(str(path), [path], error=f"not a readable DICOM file ({err})"))
            continue
        if _text(header.file_meta, "MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY:
            continue  # a DICOMDIR: the index of a CD, not an image
        uid = _text(header, "SeriesInstanceUID")
        if not uid:
            broken.append(DicomSeries(str(path), [path], error="lacks SeriesInstanceUID: a damaged or incomplete "
                                                               "DICOM file"))
            continue
        groups.setdefault(uid, []).append(path)
        headers.setdefault(uid, header)

    def series_number(uid: str) -> tuple:
        number = headers[uid].get("SeriesNumber")
        return (number is None, int(number) if number is not None else 0, uid)

    uids = sorted(groups, key=series_number)
    series = []
    for k, uid in enumerate(uids, start=1):
        name = str(folder) if len(uids) == 1 else f"{folder}#{k}"
        header = headers[uid]
        files = sorted(groups[uid])
        series.append(DicomSeries(name, files, _skip_reason(header),
                                  study=str(header.get("StudyInstanceUID", "")), normal=_normal(header),
                                  slice_thickness=_float_or_none(header.get("SliceThickness")),
                                  slices=[whole[path] for path in files] if read_whole else None))
    return series + broken


def _normal(header) -> tuple[float, float, float] | None:
    try:
        cosines = np.array([float(v) for v in header.get("ImageOrientationPatient")], dtype=float)
        return tuple(float(v) for v in np.cross(cosines[:3], cosines[3:]))
    except (TypeError, ValueError, IndexError):
        return None


def _float_or_none(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _skip_reason(header) -> str | None:
    """Why a series is not a CT volume to read, from its first file's header."""
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    sop_class = str(header.get("SOPClassUID", ""))
    modality = str(header.get("Modality", ""))
    if "LOCALIZER" in image_type:
        return "a localizer (scout) series, not a CT volume"
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return "a secondary capture (screenshot), not a CT volume"
    if image_type and image_type[0] == "DERIVED":
        return f"a derived image series (ImageType {'/'.join(image_type)}), not original CT"
    if modality and modality != "CT":
        return f"modality {modality}, expected CT"
    return None


def load_dicom_series(series: DicomSeries) -> CTVolume:
    """Read one series into a canonical :class:`CTVolume` (see the module docstring for what is refused).

    Raises:
        CTFileError: naming the series folder (and the slice file) and the problem.
    """
    pydicom = _pydicom()
    name = series.name
    if series.skip_reason:
        raise SkippedSeries(name, series.skip_reason)
    if series.error:
        raise CTFileError(name, series.error)
    if len(series.files) < 2:
        only = f" ({series.files[0].name})" if series.files else ""
        raise CTFileError(name, f"a single 2D slice{only}, expected a series of slices forming a 3D volume")

    slices, series.slices = series.slices, None  # read whole by find_series, or now: each file once
    if slices is None:
        slices = []
        for path in series.files:
            try:
                slices.append(pydicom.dcmread(path))
            except Exception as err:
                raise CTFileError(path, f"not a readable DICOM file ({err})") from err
    geometry = [_slice_geometry(path, header) for path, header in zip(series.files, slices)]
    order = _check_grid(name, series.files, geometry)

    first, last = geometry[order[0]], geometry[order[-1]]
    row_cosines, column_cosines = first.orientation[:3], first.orientation[3:]
    row_spacing, column_spacing = first.pixel_spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosines * column_spacing  # i: column index, along the row direction
    affine_lps[:3, 1] = column_cosines * row_spacing  # j: row index, along the column direction
    affine_lps[:3, 2] = (last.position - first.position) / (len(order) - 1)
    affine_lps[:3, 3] = first.position
    affine = LPS_TO_RAS @ affine_lps

    rows, columns = first.size
    integral = all(float(g.slope).is_integer() and float(g.intercept).is_integer() for g in geometry)
    # Integral HU go straight into int16 (what is stored) while they fit, into int32 from the first
    # slice that does not; each slice is filled in one pass, in place in the canonical volume.
    data = _canonical_buffer((columns, rows, len(order)), affine, np.int16 if integral else np.float32)
    for k, index in enumerate(order):
        path, g = series.files[index], geometry[index]
        pixels = _pixels(pydicom, path, slices[index])
        slices[index] = None  # its encoded pixel data is no longer needed
        if pixels.shape != (rows, columns):
            raise CTFileError(path, f"pixel data has shape {pixels.shape}, expected (Rows, Columns) = "
                                    f"{(rows, columns)}")
        if integral and g.slope == 1:  # the usual case: one pass, no temporary
            if data.dtype == np.int16 and not _fits_int16(pixels, int(g.intercept)):
                data = data.astype(np.int32, order="K")
            np.add(pixels, np.int32(g.intercept), out=data[:, :, k].T, casting="unsafe")
        elif integral:
            hu = pixels.astype(np.int32) * int(g.slope) + int(g.intercept)
            if data.dtype == np.int16 and (hu.min() < _STORED_INT16.min or hu.max() > _STORED_INT16.max):
                data = data.astype(np.int32, order="K")
            data[:, :, k] = hu.T
        else:
            data[:, :, k] = (pixels.astype(np.float64) * g.slope + g.intercept).T
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)  # scanner coordinates
    image.header.set_sform(affine, code=1)
    return ct_from_image(image, name)


def _canonical_buffer(shape_ijk: tuple[int, int, int], affine: np.ndarray, dtype) -> np.ndarray:
    """An empty ``(i, j, k)`` = (column, row, slice) array whose canonical ``(D, H, W)`` view (what
    `ct_from_image` makes of it) is C-contiguous, so the volume is never copied to reorient it."""
    source = orientations.io_orientation(affine)
    if np.isnan(source).any():  # no canonical layout: `ct_from_image` names the problem
        return np.empty(shape_ijk, dtype=dtype, order="F")
    canonical_xyz = orientations.apply_orientation(np.broadcast_to(np.empty((), dtype), shape_ijk), source).shape
    return source_layout(np.empty(canonical_xyz[::-1], dtype=dtype), source)  # a (D, H, W) buffer, seen as (i, j, k)


@dataclass
class _SliceGeometry:
    position: np.ndarray  # ImagePositionPatient, mm (LPS)
    orientation: np.ndarray  # ImageOrientationPatient: row then column direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    size: tuple[int, int]  # (Rows, Columns)
    slope: float
    intercept: float


def _slice_geometry(path: Path, header) -> _SliceGeometry:
    frames = int(_text(header, "NumberOfFrames") or 1)
    if frames > 1:
        raise CTFileError(path, f"a multi-frame file ({frames} frames); only single-frame slice series are read")
    position, orientation, pixel_spacing = (_numbers(header, tag) for tag in _GEOMETRY_TAGS)
    rows, columns = _ushort(header, "Rows"), _ushort(header, "Columns")
    missing = [tag for tag, value in zip((*_GEOMETRY_TAGS, "Rows", "Columns"),
                                         (position, orientation, pixel_spacing, rows, columns)) if value is None]
    if missing:
        raise CTFileError(path, f"lacks {', '.join(missing)}: the slice's geometry is unknown")
    samples = _ushort(header, "SamplesPerPixel", 1)
    photometric = _text(header, "PhotometricInterpretation") or "MONOCHROME2"
    if samples != 1 or photometric != "MONOCHROME2":
        raise CTFileError(path, f"{photometric} with {samples} sample(s) per pixel; CT slices are MONOCHROME2")
    tilt = float(_text(header, "GantryDetectorTilt") or 0)
    if abs(tilt) > 1e-3:
        raise CTFileError(path, f"gantry tilt of {tilt:g} degrees: the slices do not form a rectangular grid "
                                "(resample the series to an untilted grid first)")
    return _SliceGeometry(
        position=np.array(position),
        orientation=np.array(orientation),
        pixel_spacing=(pixel_spacing[0], pixel_spacing[1]),
        size=(int(rows), int(columns)),
        slope=float(_text(header, "RescaleSlope") or 1),
        intercept=float(_text(header, "RescaleIntercept") or 0),
    )


def _text(header, keyword: str) -> str | None:
    """A text-valued tag (DS, IS, CS, UI) as its stripped text, or None when absent or empty.

    Read from the raw element when pydicom has not converted it yet: pydicom's conversion of
    an element (about 20 us) costs more per slice, over a slice's dozen tags, than decoding its
    pixels (it was most of `prepare`'s overhead over a plain pydicom read).
    """
    element = header.get_item(_tag(keyword))
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        text = value.decode("ascii", errors="replace").strip(" \0")
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = "" if value is None else str(value).strip()
    return text or None


def _ushort(header, keyword: str, default: int | None = None) -> int | None:
    """An unsigned-short tag (US: Rows, BitsAllocated, ...) from its raw bytes when not yet converted
    (as `_text`), else its value; `default` when absent or empty."""
    element = header.get_item(_tag(keyword))
    value = None if element is None else element.value
    if isinstance(value, bytes):
        return int.from_bytes(value[:2], "little" if element.is_little_endian else "big") if value else default
    return default if value is None else int(value)


@functools.cache
def _tag(keyword: str) -> int:
    """The (group, element) tag of a DICOM keyword, as an int (pydicom's lookup by keyword costs 2 us)."""
    return int(_pydicom().datadict.tag_for_keyword(keyword))


def _numbers(header, keyword: str) -> list[float] | None:
    """A decimal-string tag (DS, possibly multi-valued) as floats, or None when absent or empty."""
    text = _text(header, keyword)
    return [float(v) for v in text.split("\\")] if text else None


def _check_grid(name: str, files: list[Path], geometry: list[_SliceGeometry]) -> list[int]:
    """The slice order along the normal; errors for anything but a regular grid."""
    reference = geometry[0]
    turned = np.abs(np.array([g.orientation for g in geometry]) - reference.orientation).max(axis=1)
    for k in np.flatnonzero(turned > _ORIENTATION_TOLERANCE)[:1]:
        raise CTFileError(name, f"mixed orientations: {files[0].name} has ImageOrientationPatient "
                                f"{_fmt(reference.orientation)} but {files[k].name} has {_fmt(geometry[k].orientation)}")
    spacings = np.array([g.pixel_spacing for g in geometry])
    resized = ~np.isclose(spacings, reference.pixel_spacing, rtol=1e-4, atol=1e-8).all(axis=1)
    resized |= np.array([g.size != reference.size for g in geometry])
    for k in np.flatnonzero(resized)[:1]:
        g = geometry[k]
        raise CTFileError(name, f"slices differ in size: {files[0].name} is {reference.size} pixels of "
                                f"{reference.pixel_spacing} mm, {files[k].name} is {g.size} of {g.pixel_spacing} mm")
    normal = np.cross(reference.orientation[:3], reference.orientation[3:])
    along = np.array([g.position @ normal for g in geometry])
    order = [int(i) for i in np.argsort(along, kind="stable")]
    steps = np.diff(along[order])
    for k, step in enumerate(steps):
        if step < 1e-3:
            a, b = files[order[k]].name, files[order[k + 1]].name
            raise CTFileError(name, f"two slices at the same position ({along[order[k]]:.3f} mm along the normal): "
                                    f"{a} and {b}")
    step = float(np.median(steps))
    for k, gap in enumerate(steps):
        if gap > _GAP_FACTOR * step:
            a, b = files[order[k]].name, files[order[k + 1]].name
            raise CTFileError(name, f"missing slices: a gap of {gap:.3f} mm between {a} and {b} where the slice "
                                    f"spacing is {step:.3f} mm (about {round(gap / step) - 1} slice(s) missing)")
    if np.abs(steps - step).max() > _SPACING_TOLERANCE * step:
        raise CTFileError(name, f"non-uniform slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm "
                                f"(median {step:.3f} mm); resample the series to a uniform grid first")
    drift = geometry[order[-1]].position - geometry[order[0]].position
    sideways = np.linalg.norm(drift - (drift @ normal) * normal) / (along[order[-1]] - along[order[0]])
    if sideways > _SHEAR_TOLERANCE:
        raise CTFileError(name, f"gantry tilt: slice positions drift {sideways:.3f} mm sideways per mm along the "
                                "slice normal, so the slices do not form a rectangular grid")
    return order


def _fits_int16(pixels: np.ndarray, intercept: int) -> bool:
    """Whether ``pixels + intercept`` stays within int16: from the dtype's range when that settles it,
    else from the slice's extremes."""
    info = np.iinfo(pixels.dtype) if pixels.dtype.kind in "iu" else None
    low_settled = info is not None and _STORED_INT16.min <= info.min + intercept
    high_settled = info is not None and info.max + intercept <= _STORED_INT16.max
    return (low_settled or _STORED_INT16.min <= int(pixels.min()) + intercept) and (
        high_settled or int(pixels.max()) + intercept <= _STORED_INT16.max)


def _native_pixels(path: Path, dataset, syntax) -> np.ndarray | None:
    """The slice's 16-bit little-endian uncompressed pixels straight from the buffer, or None for anything
    else (left to pydicom's ``pixel_array``); an error naming ``path`` when the file ends inside them.

    What pydicom does for this case, without its generic decoder set-up (which costs more than the
    rest of reading the slice): the bytes as (u)int16 (PixelRepresentation), the bits above
    BitsStored cleared (unsigned) or sign-extended (signed), as ``pixel_array`` does.
    """
    if syntax not in _NATIVE_LITTLE_ENDIAN:
        return None
    element = dataset.get_item(_tag("PixelData"))
    rows, columns = _ushort(dataset, "Rows"), _ushort(dataset, "Columns")
    if element is None or rows is None or columns is None or _ushort(dataset, "BitsAllocated") != 16:
        return None
    data = element.value
    if not isinstance(data, bytes):
        return None
    if len(data) < 2 * rows * columns:
        raise CTFileError(path, f"truncated: the pixel data ends after {len(data)} of {2 * rows * columns} bytes")
    signed = _ushort(dataset, "PixelRepresentation", 0) == 1
    pixels = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns).reshape(rows, columns)
    unused = 16 - (_ushort(dataset, "BitsStored") or 16)
    if unused > 0:
        pixels = (pixels << unused) >> unused
    return pixels


def _pixels(pydicom, path: Path, dataset) -> np.ndarray:
    """The stored values of one slice (``dataset``, read from ``path``); a clear error when its transfer
    syntax cannot be decoded."""
    import pydicom.pixels

    if _tag("PixelData") not in dataset:  # pydicom drops an element the file ends inside of
        raise CTFileError(path, "no pixel data: the file is truncated, or holds no image")
    syntax = _text(dataset.file_meta, "TransferSyntaxUID")
    native = _native_pixels(path, dataset, syntax)
    if native is not None:
        return native
    try:
        return dataset.pixel_array
    except Exception as err:
        syntax = pydicom.uid.UID(syntax) if syntax else None
        if syntax is None or not syntax.is_compressed:
            raise CTFileError(path, f"pixel data cannot be read ({err})") from err
        what = f"pixel data in the compressed transfer syntax '{syntax.name}' ({syntax}) cannot be decoded"
        try:
            decoder = pydicom.pixels.get_decoder(syntax)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            options = "; ".join(decoder.missing_dependencies) if decoder is not None else "none known to pydicom"
            raise CTFileError(path, f"{what}: no decoder for it is installed (install one of: {options}), or "
                                    "decompress the series first (gdcmconv --raw)") from err
        detail = str(err).strip().splitlines()[-1].strip()
        raise CTFileError(path, f"{what}: the installed decoders failed ({detail}): damaged pixel data?") from err


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
