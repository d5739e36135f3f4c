"""NRRD and MetaImage (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) in and out, via SimpleITK.

SimpleITK (an optional extra: ``pip install 'ctpa-vq[clinical]'``) reads both formats with
their origin, spacing and direction (ITK's LPS convention). On the way in the image becomes a
NIfTI-convention affine (RAS) and goes through :func:`~ctpa_vq.data.nifti.ct_from_image`, so an
NRRD volume is canonicalised exactly like a NIfTI one; :func:`save_itk_like` writes a result
back in the input's own voxel layout and geometry.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ..utils.atomic import atomic_path
from .nifti import LPS_TO_RAS, CTFileError, CTVolume, _as_storage_dtype, ct_from_image

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def _sitk():
    try:
        import SimpleITK
    except ImportError as err:
        raise CTFileError("NRRD/MetaImage", "reading them needs SimpleITK: pip install 'ctpa-vq[clinical]'") from err
    return SimpleITK


def load_itk(path: str | os.PathLike) -> CTVolume:
    """Read a 3D scalar NRRD / MetaImage volume into a canonical :class:`CTVolume`.

    Raises:
        FileNotFoundError: the file does not exist.
        CTFileError: unreadable, not 3D, or not one value per voxel.
    """
    sitk = _sitk()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        problem = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise CTFileError(path, f"not a readable NRRD/MetaImage file ({problem})") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTFileError(path, f"has {image.GetNumberOfComponentsPerPixel()} values per voxel, expected one (HU)")
    if image.GetDimension() != 3:
        kind = "a single 2D slice" if image.GetDimension() == 2 else f"{image.GetDimension()}D"
        raise CTFileError(path, f"is {kind} (size {image.GetSize()}), expected a 3D volume")
    data_zyx = sitk.GetArrayFromImage(image)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    nifti = nib.Nifti1Image(data_zyx.transpose(2, 1, 0), LPS_TO_RAS @ affine_lps)
    return ct_from_image(nifti, str(path))


def save_itk_like(hu: np.ndarray, reference: CTVolume, path: str | os.PathLike) -> Path:
    """Write canonical ``hu`` (D, H, W) as NRRD/MetaImage on ``reference``'s own grid, atomically."""
    sitk = _sitk()
    path = Path(path)
    hu = np.asarray(hu)
    if hu.dtype.kind == "f" and not np.isfinite(hu).all():
        raise ValueError(f"{path}: refusing to write NaN/Inf voxels")
    data_xyz = reference.to_source_orientation(_as_storage_dtype(hu))
    image = sitk.GetImageFromArray(np.ascontiguousarray(data_xyz.transpose(2, 1, 0)))
    affine_lps = LPS_TO_RAS @ reference.source_affine
    spacing = np.sqrt((affine_lps[:3, :3] ** 2).sum(axis=0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    suffix = next(s for s in ITK_SUFFIXES if path.name.endswith(s)) if path.name.endswith(ITK_SUFFIXES) else path.suffix
    if suffix in (".mhd", ".nhdr"):  # header + separate data file: no single file to rename into place
        sitk.WriteImage(image, str(path), True)
        return path
    with atomic_path(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), True)
    return path
