"""CT data: NIfTI / NRRD / MetaImage / DICOM series in, NIfTI / NRRD out, synthetic CTPA phantoms,
resampling, dataset preparation and patch access."""

from __future__ import annotations

from .nifti import CTFileError, CTVolume, ct_from_image, load_ct, save_ct_like
from .patch_dataset import RandomPatchDataset, VolumeStore
from .phantom import make_phantom, write_phantom_dir, write_phantom_nifti
from .prepare import PrepareReport, prepare_dataset
from .volume_io import find_volumes, load_volume, save_volume_like

__all__ = [
    "CTFileError",
    "CTVolume",
    "PrepareReport",
    "RandomPatchDataset",
    "VolumeStore",
    "ct_from_image",
    "find_volumes",
    "load_ct",
    "load_volume",
    "make_phantom",
    "prepare_dataset",
    "save_ct_like",
    "save_volume_like",
    "write_phantom_dir",
    "write_phantom_nifti",
]
