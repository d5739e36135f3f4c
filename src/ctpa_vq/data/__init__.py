"""CT data: NIfTI in/out, synthetic CTPA phantoms, dataset preparation and patch access."""

from __future__ import annotations

from .nifti import CTFileError, CTVolume, ct_from_image, load_ct, save_ct_like
from .patch_dataset import GridPatchDataset, RandomPatchDataset, VolumeStore
from .phantom import make_phantom, write_phantom_dir, write_phantom_nifti
from .prepare import PrepareReport, prepare_dataset

__all__ = [
    "CTFileError",
    "CTVolume",
    "GridPatchDataset",
    "PrepareReport",
    "RandomPatchDataset",
    "VolumeStore",
    "ct_from_image",
    "load_ct",
    "make_phantom",
    "prepare_dataset",
    "save_ct_like",
    "write_phantom_dir",
    "write_phantom_nifti",
]
