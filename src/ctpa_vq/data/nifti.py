"""NIfTI in and out: CT volumes in one canonical orientation, written back in their own.

On the way in a volume is reoriented to the closest canonical RAS orientation (what
``nibabel.as_closest_canonical`` does) and its ``(X, Y, Z)`` array is transposed to
``(D, H, W) = (Z, Y, X)``. Everything needed to undo that (the source affine, header and
orientation) travels with the volume, so :func:`save_ct_like` writes a result voxel for voxel
in the input's own orientation, affine and header.

Integral HU data stays ``int16`` (``scl_slope``/``scl_inter`` applied in integer arithmetic);
anything else is ``float32``.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from ..utils.atomic import atomic_path

_INT16 = np.iinfo(np.int16)
try:  # ISA-L's gzip decoder: twice zlib's speed on .nii.gz (a dependency; a bundled remote-code copy may lack it)
    from isal import igzip, isal_zlib
except ImportError:
    igzip = isal_zlib = None
_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, ValueError, *((isal_zlib.error,) if isal_zlib else ()))
"""What reading a truncated or corrupt (gzipped) file raises: nibabel's, zlib's and ISA-L's errors."""
_RAS = orientations.axcodes2ornt(("R", "A", "S"))
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM / ITK patient coordinates (LPS) -> NIfTI's RAS: a 4x4 affine applied on the left."""


class CTFileError(ValueError):
    """A CT file that cannot be used; the message names the file and the problem."""

    def __init__(self, name: str | os.PathLike, problem: str):
        self.name = str(name)
        self.problem = problem
        super().__init__(f"{self.name}: {problem}")


@dataclass
class CTVolume:
    """A CT volume in canonical orientation, plus what is needed to write it back.

    Attributes:
        hu: (D, H, W) = (Z, Y, X) array in RAS orientation, ``int16`` if integral else ``float32``.
        spacing: voxel size in mm along (D, H, W).
        affine: 4x4 canonical affine in nibabel's convention: maps voxel indices
            ``(x, y, z) = (w, h, d)`` to RAS mm.
        name: where the volume came from (file path or a caller-given name).
        source_affine: the input's own 4x4 affine.
        source_header: the input's NIfTI header (copied).
        source_orientation: ``(3, 2)`` nibabel orientation of the source axes w.r.t. RAS.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    name: str
    source_affine: np.ndarray
    source_header: nib.Nifti1Header
    source_orientation: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)

    def to_source_orientation(self, hu: np.ndarray) -> np.ndarray:
        """Map a canonical (D, H, W) array back to the source file's (i, j, k) voxel layout."""
        if tuple(hu.shape) != self.shape:
            raise ValueError(f"{self.name}: array shape {tuple(hu.shape)} != volume shape {self.shape}")
        return source_layout(hu, self.source_orientation)


def source_layout(hu: np.ndarray, source_orientation: np.ndarray) -> np.ndarray:
    """A view of canonical ``(D, H, W)`` ``hu`` in the layout of a source whose axes have
    ``source_orientation`` (nibabel's ``(3, 2)`` form): the inverse of `ct_from_image`'s reorientation."""
    return orientations.apply_orientation(hu.transpose(2, 1, 0), orientations.ornt_transform(_RAS, source_orientation))


def load_ct(path: str | os.PathLike) -> CTVolume:
    """Read a ``.nii`` / ``.nii.gz`` CT volume into canonical orientation (see :class:`CTVolume`).

    Raises:
        FileNotFoundError: the file does not exist.
        CTFileError: the file is not NIfTI, is truncated/corrupt, is not 3D, holds NaN/Inf
            or has an orientation that cannot be determined.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(path)
    except (nib.filebasedimages.ImageFileError, *_DECOMPRESSION_ERRORS) as err:
        raise CTFileError(path, f"not a readable NIfTI file ({err})") from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CTFileError(path, f"is a {type(img).__name__}, expected NIfTI")
    if igzip is None or not path.name.endswith(".gz"):
        return ct_from_image(img, str(path))
    with igzip.open(path, "rb") as stream:  # the voxels through ISA-L, not nibabel's zlib
        try:
            img = type(img).from_stream(stream)
        except _DECOMPRESSION_ERRORS as err:  # the header read: the rest of the file is bad
            raise CTFileError(path, f"voxel data cannot be read: file truncated or corrupt ({err})") from err
        return ct_from_image(img, str(path))


def ct_from_image(img: nib.Nifti1Image, name: str) -> CTVolume:
    """Bring an in-memory or on-disk NIfTI image to a canonical :class:`CTVolume`."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        kind = f"{len(shape)}D" + (f" with {shape[3]} volumes" if len(shape) == 4 else "")
        raise CTFileError(name, f"is {kind} (shape {tuple(img.shape)}), expected a 3D volume")
    if min(shape) < 2:
        raise CTFileError(name, f"has shape {shape}: a single slice, expected a 3D volume")

    source_affine = np.asarray(img.affine, dtype=np.float64)
    source_orientation = _orientation(source_affine, name)
    data = _read_hu(img, name).reshape(shape)

    canonical_xyz = orientations.apply_orientation(data, source_orientation)
    affine = source_affine @ orientations.inv_ornt_aff(source_orientation, shape)
    spacing_xyz = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return CTVolume(
        hu=np.ascontiguousarray(canonical_xyz.transpose(2, 1, 0)),
        spacing=tuple(float(s) for s in spacing_xyz[::-1]),
        affine=affine,
        name=name,
        source_affine=source_affine,
        source_header=img.header.copy(),
        source_orientation=source_orientation,
    )


def save_ct_like(hu: np.ndarray, reference: CTVolume, path: str | os.PathLike) -> Path:
    """Write canonical ``hu`` (D, H, W) in ``reference``'s own orientation, affine and header.

    The file is ``int16`` when ``hu`` is integral and fits, else ``float32``. It is written to a
    temporary file in the same directory and renamed into place, so a failed write leaves
    nothing behind. Returns the path written.
    """
    path = Path(path)
    hu = np.asarray(hu)
    if hu.dtype.kind == "f" and not np.isfinite(hu).all():
        raise ValueError(f"{path}: refusing to write NaN/Inf voxels")
    data = reference.to_source_orientation(_as_storage_dtype(hu))

    header = reference.source_header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    if len(header.get_data_shape()) == 4:  # a (X, Y, Z, 1) source: keep its dimensionality
        data = data[..., np.newaxis]
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, reference.source_affine, header=header)

    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix or ".nii"
    with atomic_path(path, suffix) as tmp:
        nib.save(image, tmp)
    return path


def _orientation(affine: np.ndarray, name: str) -> np.ndarray:
    """Source axes w.r.t. RAS; an error if the affine cannot say (NaN, singular, degenerate)."""
    if not np.isfinite(affine).all():
        raise CTFileError(name, "unknown orientation: the affine holds NaN/Inf")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CTFileError(name, f"unknown orientation: singular affine\n{affine[:3, :3]}")
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any() or len(set(ornt[:, 0].tolist())) != 3:
        raise CTFileError(name, f"unknown orientation: axes of the affine are degenerate\n{affine[:3, :3]}")
    return ornt


def _read_hu(img: nib.Nifti1Image, name: str) -> np.ndarray:
    """The voxel data with scaling applied, as int16 when integral and in range."""
    try:
        if nib.is_proxy(img.dataobj):
            raw = img.dataobj.get_unscaled()
            slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
        else:
            raw, slope, inter = np.asanyarray(img.dataobj), 1.0, 0.0
    except _DECOMPRESSION_ERRORS as err:
        raise CTFileError(name, f"voxel data cannot be read: file truncated or corrupt ({err})") from err

    if raw.dtype.kind in "iub" and float(slope).is_integer() and float(inter).is_integer():
        if (slope, inter) == (1.0, 0.0):
            return _as_storage_dtype(raw)
        return _as_storage_dtype(raw.astype(np.int64) * int(slope) + int(inter))
    if raw.dtype.kind not in "iubf":
        raise CTFileError(name, f"unsupported voxel type {raw.dtype}")
    data = raw.astype(np.float64) * slope + inter if (slope, inter) != (1.0, 0.0) else raw
    if not np.isfinite(data).all():
        raise CTFileError(name, "holds NaN or Inf voxels")
    return _as_storage_dtype(data)


def _as_storage_dtype(hu: np.ndarray) -> np.ndarray:
    """int16 when integral and within int16, else float32."""
    if hu.dtype == np.int16:
        return hu
    if hu.size and (hu.min() < _INT16.min or hu.max() > _INT16.max):
        return hu.astype(np.float32)
    if hu.dtype.kind in "iub" or np.array_equal(hu, np.round(hu)):
        return hu.astype(np.int16)
    return hu.astype(np.float32)
