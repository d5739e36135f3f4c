"""``prepare``: a directory of CT volumes -> a ``datasets.DatasetDict`` on disk.

Inputs are NIfTI, NRRD/MetaImage files and DICOM series folders (:mod:`.volume_io`). Every
volume is read in canonical RAS, (D, H, W), optionally resampled to a target spacing
(:mod:`.resample`), and stored as one row: its int16 HU bytes plus shape, spacing, affine,
the shape and spacing it had before resampling, a patient id and a source name. Rows are
written one at a time, so memory stays at about one volume; the Arrow files are memory-mapped
on reading, which lets :mod:`ctpa_vq.data.patch_dataset` read one patch without reading the volume.

Patient ids: a file (or DICOM series folder) directly in the input directory is its own patient
(its name without the format suffix); one in a sub-directory belongs to the patient named by the
first sub-directory (``input/patient07/scan_a.nii.gz`` -> ``patient07``). Train and validation are
split by patient, so no patient is in both; a split left with no usable volume is not written
(``val_fraction=0`` gives a ``train`` split only).

Privacy: by default the dataset holds pseudonyms (:mod:`ctpa_vq.privacy`), never a patient id or
a path: ``patient_id`` is the keyed hash of the patient id and ``source`` that of the path relative
to the input directory. Only geometry and HU reach the dataset from a DICOM file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from ..atomic import replace_folder
from ..privacy import PseudonymKey
from .nifti import CTFileError
from .resample import resample, resampled_affine
from .volume_io import INPUT_KINDS, VOLUME_SUFFIXES, VolumeSource, find_volumes

FEATURES = datasets.Features(
    {
        "patient_id": datasets.Value("string"),
        "hu": datasets.Value("large_binary"),  # int16, C order, shape (D, H, W)
        "shape": datasets.List(datasets.Value("int32"), length=3),  # (D, H, W)
        "spacing": datasets.List(datasets.Value("float64"), length=3),  # mm along (D, H, W)
        "affine": datasets.List(datasets.List(datasets.Value("float64"), length=4), length=4),  # canonical RAS
        "source": datasets.Value("string"),
        "source_shape": datasets.List(datasets.Value("int32"), length=3),  # (D, H, W) before resampling
        "source_spacing": datasets.List(datasets.Value("float64"), length=3),  # mm before resampling
    }
)


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did: which patients went where, which volumes were skipped and why.

    Patients are listed as stored in the dataset (pseudonyms unless identifiers were kept);
    skipped volumes by path, so they can be found and fixed (paths are never stored).
    """

    output_dir: Path
    train_patients: list[str] = field(default_factory=list)
    val_patients: list[str] = field(default_factory=list)
    used_files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    target_spacing: tuple[float, float, float] | None = None

    def summary(self) -> str:
        resampled = f", resampled to {_mm(self.target_spacing)} mm" if self.target_spacing else ""
        lines = [
            f"used {len(self.used_files)} volume(s) of {len(self.train_patients) + len(self.val_patients)} patient(s) "
            f"(train {len(self.train_patients)}, validation {len(self.val_patients)}){resampled}; "
            f"skipped {len(self.skipped)} -> {self.output_dir}"
        ]
        lines += [f"  skipped {reason}" for _, reason in self.skipped]
        return "\n".join(lines)


def patient_id(path: Path, input_dir: Path) -> str:
    """The patient a volume belongs to (see the module docstring)."""
    parts = path.relative_to(input_dir).parts
    first = parts[0] if parts else input_dir.name  # DICOM files directly in the input directory
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if first.endswith(suffix):
            return first[: -len(suffix)]
    return first


def split_patients(
    patients: list[str], val_fraction: float, max_patients: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) patient lists: a seeded shuffle of the sorted ids, capped at ``max_patients``.

    At least one patient stays in train; validation gets ``round(val_fraction * n)`` patients,
    at least one when ``val_fraction > 0`` and there are two or more patients.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = sorted(set(patients))
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    if max_patients is not None:
        if max_patients < 1:
            raise ValueError(f"max_patients must be at least 1, got {max_patients}")
        order = order[:max_patients]
    n_val = min(max(round(val_fraction * len(order)), 1 if val_fraction > 0 else 0), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def prepare_dataset(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    max_patients: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    target_spacing: Sequence[float] | None = None,
    keep_identifiers: bool = False,
    key: PseudonymKey | None = None,
) -> PrepareReport:
    """Read every CT volume under ``input_dir`` and write a train/validation ``DatasetDict``.

    Args:
        target_spacing: resample every volume to this (D, H, W) spacing in mm; None keeps each
            volume's own grid.
        keep_identifiers: store patient ids and relative paths as they are instead of pseudonyms.
        key: the pseudonymisation key (default :meth:`PseudonymKey.load`: created on first use).

    Unreadable volumes are skipped and reported by name with the reason. The output appears
    atomically (built in a temporary sibling directory, then renamed); inputs are only read.

    Raises:
        FileNotFoundError: ``input_dir`` does not exist.
        ValueError: no volume found, none usable, or ``output_dir`` exists (without ``overwrite``).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: no such directory")
    if output_dir.exists() and not overwrite:
        raise ValueError(f"{output_dir}: already exists (choose another output, or pass --overwrite)")
    if target_spacing is not None:
        target_spacing = tuple(float(t) for t in target_spacing)
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise ValueError(f"target spacing must be 3 positive values in mm (D, H, W), got {target_spacing}")
    sources = find_volumes(input_dir)
    if not sources:
        raise ValueError(f"{input_dir}: no volumes found (expected {INPUT_KINDS})")
    if not keep_identifiers and key is None:
        key = PseudonymKey.load()
    name = (lambda text: text) if keep_identifiers else key.pseudonym

    sources_by_patient: dict[str, list[VolumeSource]] = {}
    for source in sources:
        sources_by_patient.setdefault(patient_id(source.path, input_dir), []).append(source)
    train, val = split_patients(list(sources_by_patient), val_fraction, max_patients, seed)
    report = PrepareReport(output_dir=output_dir, target_spacing=target_spacing)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    was_disabled = datasets.is_progress_bar_enabled() is False
    if not progress:
        datasets.disable_progress_bars()
    try:
        with tqdm(total=sum(len(sources_by_patient[p]) for p in train + val), desc="prepare", unit="volume",
                  disable=not progress) as bar:
            splits = {}
            for split, patients in (("train", train), ("validation", val)):
                rows = _Rows(input_dir, report, bar, name, target_spacing)
                split_sources = [(name(p), s) for p in patients for s in sources_by_patient[p]]
                dataset = _build_split(split, split_sources, rows, work_dir / "cache") if split_sources else None
                if dataset is not None:
                    splits[split] = dataset
                    setattr(report, "train_patients" if split == "train" else "val_patients", sorted(rows.patients))
        if not report.used_files:
            raise ValueError(f"{input_dir}: none of the {len(report.skipped)} volume(s) is usable:\n"
                             + "\n".join(reason for _, reason in report.skipped))
        datasets.DatasetDict(splits).save_to_disk(str(work_dir / "dataset"))
        replace_folder(work_dir / "dataset", output_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        if not progress and not was_disabled:
            datasets.enable_progress_bars()
    return report


def _build_split(
    split: str, sources: list[tuple[str, VolumeSource]], rows: "_Rows", cache_dir: Path
) -> datasets.Dataset | None:
    """One split as an Arrow dataset in ``cache_dir``, written one volume at a time (None if no volume is usable)."""
    names = [rows.name(source.name) for _, source in sources]  # pseudonyms: the fingerprint is stored
    fingerprint = hashlib.sha256("\n".join([split, str(rows.target_spacing), *names]).encode()).hexdigest()[:32]
    try:
        return datasets.Dataset.from_generator(
            rows,
            features=FEATURES,
            cache_dir=str(cache_dir),
            gen_kwargs={"sources": sources},
            fingerprint=fingerprint,
            writer_batch_size=1,
            split=split,
        )
    except ValueError:
        if not rows.patients:  # every volume of this split was skipped: no rows
            return None
        raise


@dataclass
class _Rows:
    """The row generator of one split; records what it used and skipped in ``report``."""

    input_dir: Path
    report: PrepareReport
    bar: tqdm
    name: Callable[[str], str]  # identifier -> what the dataset stores (its pseudonym, or itself)
    target_spacing: tuple[float, float, float] | None
    patients: list[str] = field(default_factory=list)

    def __call__(self, sources: list[tuple[str, VolumeSource]]) -> Iterator[dict]:
        for patient, source in sources:
            try:
                volume = source.load()
            except (CTFileError, FileNotFoundError) as err:
                self.report.skipped.append((source.path, str(err)))
            else:
                self.report.used_files.append(source.path)
                if patient not in self.patients:
                    self.patients.append(patient)
                yield self._row(patient, source, volume)
            self.bar.update(1)

    def _row(self, patient: str, source: VolumeSource, volume) -> dict:
        hu, spacing, affine = volume.hu, volume.spacing, volume.affine
        if self.target_spacing is not None:
            hu = resample(hu, spacing, self.target_spacing)
            spacing, affine = self.target_spacing, resampled_affine(affine, volume.spacing, self.target_spacing)
        if hu.dtype != np.int16:  # resampled, non-integral or out-of-range HU: rounded and clipped to int16
            hu = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
        return {
            "patient_id": patient,
            "hu": hu.tobytes(),
            "shape": list(hu.shape),
            "spacing": list(spacing),
            "affine": np.asarray(affine).tolist(),
            "source": self.name(os.path.relpath(source.name, self.input_dir)),
            "source_shape": list(volume.shape),
            "source_spacing": list(volume.spacing),
        }


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{s:g}" for s in spacing)
