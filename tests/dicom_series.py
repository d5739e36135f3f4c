"""Write real DICOM CT series (pydicom) from a phantom, including the bad cases readers must refuse.

Each slice carries identifying tags (PatientName, PatientID, ...) so tests can check that none of
them travels into a prepared dataset, a log or an output file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "MRN-4711-SECRET"


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def axial_orientation():
    return np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def oblique_orientation():
    row = _unit([0.96, 0.28, 0.0])
    column = _unit(np.cross(_unit([0.0, 0.1, 1.0]), row))
    return row, column


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    origin=(-120.0, -95.0, 310.0),
    pixel_spacing=(0.7, 0.8),
    orientation=None,
    steps=None,
    slope: float = 1.0,
    intercept: float = -3072.0,  # room for scanner padding (-3024 HU) in uint16
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_class=CTImageStorage,
    modality="CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    gantry_tilt: float | None = None,
    slice_thickness: float | None = None,
    file_prefix: str = "slice",
    shuffle: bool = True,
) -> list[Path]:
    """Write ``hu`` ``(S, Rows, Columns)`` as one slice per file; return the files.

    Slice ``s`` sits at ``origin + sum(steps[:s]) * normal``; ``steps`` defaults to 2.5 mm each.
    Files are named in a shuffled order (``shuffle``) so a reader must sort by position.
    Stored values are ``(hu - intercept) / slope`` as uint16.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row, column = orientation if orientation is not None else axial_orientation()
    normal = np.cross(row, column)
    n = hu.shape[0]
    steps = np.full(n - 1, 2.5) if steps is None else np.asarray(steps, dtype=float)
    offsets = np.concatenate([[0.0], np.cumsum(steps)])
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    names = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    files = []
    for s in range(n):
        stored = np.rint((hu[s].astype(np.float64) - intercept) / slope)
        assert stored.min() >= 0 and stored.max() < 65536
        position = np.asarray(origin) + offsets[s] * normal
        ds = _slice_dataset(stored.astype(np.uint16), position, row, column, pixel_spacing, slope, intercept,
                            image_type, sop_class, modality, study_uid, series_uid, series_number, s + 1)
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = gantry_tilt
        if slice_thickness is not None:
            ds.SliceThickness = f"{slice_thickness:g}"
        path = folder / f"{file_prefix}{names[s]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _slice_dataset(stored, position, row, column, pixel_spacing, slope, intercept, image_type, sop_class,
                   modality, study_uid, series_uid, series_number, instance):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19500101"
    ds.StudyDate = "20240229"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-99"
    ds.InstitutionName = "St Elsewhere"
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *column)]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.SliceThickness = "2.5"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = stored.tobytes()
    return ds


def make_undecodable(path: Path, syntax=JPEG2000Lossless) -> None:
    """Rewrite a slice in a compressed ``syntax`` with a bogus codestream: no decoder can read it."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def expected_affine(files: list[Path]) -> np.ndarray:
    """The RAS affine of a series computed from its tags, independently of the reader under test:
    voxel (i, j, k) = (column, row, slice in position order)."""
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    row = np.array(slices[0].ImageOrientationPatient[:3], dtype=float)
    column = np.array(slices[0].ImageOrientationPatient[3:], dtype=float)
    normal = np.cross(row, column)
    positions = sorted((np.array(s.ImagePositionPatient, dtype=float) for s in slices), key=lambda p: p @ normal)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * dc, column * dr
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    lps[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
