"""One entry point for every CT input kind: NIfTI files, NRRD/MetaImage files, DICOM series folders.

* :func:`load_volume`: one path (a file, or a folder holding one DICOM series) -> :class:`CTVolume`.
* :func:`find_volumes`: every volume under a folder, each with a loader, so a caller reads them one
  at a time and a bad one does not stop the rest.
* :func:`input_volumes`: what a command's ``--input`` names: a file, or every volume under a folder.
* :func:`save_volume_like`: write a result on the input's own grid, as NIfTI or NRRD/MetaImage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .dicom import DicomSeries, find_series, is_dicom_file, load_dicom_series
from .itk_image import ITK_SUFFIXES, load_itk, save_itk_like
from .nifti import CTFileError, CTVolume, load_ct, save_ct_like

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
INPUT_KINDS = ".nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd files or DICOM series folders"


@dataclass
class VolumeSource:
    """One volume found under a folder: its name (file, series folder, or ``folder#k``), its
    path, and how to read it. ``load`` raises :class:`CTFileError` naming it and the problem.
    ``series``: the DICOM series it reads (None for a file)."""

    name: str
    path: Path
    load: Callable[[], CTVolume]
    series: DicomSeries | None = None


def load_volume(path: str | os.PathLike) -> CTVolume:
    """Read a NIfTI / NRRD / MetaImage file, or a folder holding exactly one DICOM CT series.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CTFileError: an unknown format, a folder with no or several CT series, or a bad volume.
    """
    path = Path(path)
    if path.is_dir():
        return _load_series_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.name.endswith(NIFTI_SUFFIXES):
        return load_ct(path)
    if path.name.endswith(ITK_SUFFIXES):
        return load_itk(path)
    if path.suffix.lower() == ".dcm" or is_dicom_file(path):
        raise CTFileError(path, "a single DICOM file is one 2D slice: pass the folder holding the whole series")
    raise CTFileError(path, f"unknown format: expected {INPUT_KINDS}")


def _load_series_folder(folder: Path) -> CTVolume:
    series = find_series(folder)
    broken = [s for s in series if s.error]
    if broken:
        return load_dicom_series(broken[0])  # raises, naming the unreadable file
    usable = [s for s in series if s.skip_reason is None]
    if len(usable) == 1:
        return load_dicom_series(usable[0])
    if not series:
        raise CTFileError(folder, f"no DICOM files in this folder (expected {INPUT_KINDS})")
    if not usable:
        listing = "\n".join(f"  {s.name}: {s.skip_reason}" for s in series)
        raise CTFileError(folder, f"no CT series to read:\n{listing}")
    listing = "\n".join(f"  {s.name}: {len(s.files)} file(s)" for s in usable)
    raise CTFileError(folder, f"holds {len(usable)} CT series; pass a folder with one series "
                              f"(`prepare` takes each as its own volume):\n{listing}")


def find_volumes(folder: str | os.PathLike, read_dicom_whole: bool = False) -> list[VolumeSource]:
    """Every volume under ``folder`` (recursive, sorted by name).

    Each NIfTI/NRRD/MetaImage file is a volume; the DICOM files directly in one folder form one
    volume per series. A series that is no CT volume (localizer, ...) is listed too: its ``load``
    raises :class:`~ctpa_vq.data.dicom.SkippedSeries` with the reason. Other files (notes, the
    ``.raw`` data of ``.mhd`` headers) are ignored. ``read_dicom_whole``: see
    :func:`~ctpa_vq.data.dicom.find_series` (each DICOM file read once, kept until loaded).
    """
    sources = []
    for directory, _, names in os.walk(folder):
        directory = Path(directory)
        dicom_files = []
        for file_name in sorted(names):
            path = directory / file_name
            if file_name.endswith(VOLUME_SUFFIXES):
                sources.append(VolumeSource(str(path), path, partial(load_volume, path)))
            elif is_dicom_file(path):
                dicom_files.append(path)
        if dicom_files:
            sources += [VolumeSource(series.name, directory, partial(load_dicom_series, series), series)
                        for series in find_series(directory, dicom_files, read_whole=read_dicom_whole)]
    return sorted(sources, key=lambda s: s.name)


def input_volumes(path: str | os.PathLike) -> list[VolumeSource]:
    """The volumes a command's input names: a file is one volume, a folder every volume under it
    (:func:`find_volumes`: recursive, each DICOM series its own volume), as ``prepare`` reads them.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder holding no volume.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.is_dir():
        return [VolumeSource(str(path), path, partial(load_volume, path))]
    found = find_volumes(path)
    if not found:
        raise FileNotFoundError(f"{path}: no volumes in this folder (expected {INPUT_KINDS})")
    return found


def save_volume_like(hu: np.ndarray, reference: CTVolume, path: str | os.PathLike) -> Path:
    """Write canonical ``hu`` (D, H, W) on ``reference``'s own grid: NIfTI for ``.nii``/``.nii.gz``
    (keeping a NIfTI input's header), NRRD/MetaImage for their suffixes."""
    path = Path(path)
    if path.name.endswith(NIFTI_SUFFIXES):
        return save_ct_like(hu, reference, path)
    if path.name.endswith(ITK_SUFFIXES):
        return save_itk_like(hu, reference, path)
    raise ValueError(f"{path}: output must end in {', '.join(VOLUME_SUFFIXES)}")
