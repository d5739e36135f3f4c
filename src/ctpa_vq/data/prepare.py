"""``prepare``: a directory of NIfTI CT volumes -> a ``datasets.DatasetDict`` on disk.

Every volume is read with :func:`~ctpa_vq.data.nifti.load_ct` (canonical RAS, (D, H, W)) and
stored as one row: its int16 HU bytes plus shape, spacing, affine, patient id and source
path. Rows are written one at a time, so memory stays at about one volume; the Arrow files
are memory-mapped on reading, which lets :mod:`ctpa_vq.data.patch_dataset` read one patch
without reading the volume.

Patient ids: a file directly in the input directory is its own patient (its name without
``.nii`` / ``.nii.gz``); a file in a sub-directory belongs to the patient named by the first
sub-directory (``input/patient07/scan_a.nii.gz`` -> ``patient07``). Train and validation are
split by patient, so no patient is in both; a split left with no usable volume is not written
(``val_fraction=0`` gives a ``train`` split only).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
from tqdm.auto import tqdm

from .nifti import CTFileError, load_ct

NIFTI_SUFFIXES = (".nii", ".nii.gz")

FEATURES = datasets.Features(
    {
        "patient_id": datasets.Value("string"),
        "hu": datasets.Value("large_binary"),  # int16, C order, shape (D, H, W)
        "shape": datasets.List(datasets.Value("int32"), length=3),  # (D, H, W)
        "spacing": datasets.List(datasets.Value("float64"), length=3),  # mm along (D, H, W)
        "affine": datasets.List(datasets.List(datasets.Value("float64"), length=4), length=4),  # canonical RAS
        "source": datasets.Value("string"),
    }
)


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did: which patients went where, which files were skipped and why."""

    output_dir: Path
    train_patients: list[str] = field(default_factory=list)
    val_patients: list[str] = field(default_factory=list)
    used_files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"used {len(self.used_files)} file(s) of {len(self.train_patients) + len(self.val_patients)} patient(s) "
            f"(train {len(self.train_patients)}, validation {len(self.val_patients)}); "
            f"skipped {len(self.skipped)} -> {self.output_dir}"
        ]
        lines += [f"  skipped {reason}" for _, reason in self.skipped]
        return "\n".join(lines)


def find_nifti_files(input_dir: Path) -> list[Path]:
    """All ``.nii`` / ``.nii.gz`` files under ``input_dir`` (recursive, sorted)."""
    return sorted(p for p in input_dir.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def patient_id(path: Path, input_dir: Path) -> str:
    """The patient a file belongs to (see the module docstring)."""
    first = path.relative_to(input_dir).parts[0]
    for suffix in NIFTI_SUFFIXES[::-1]:
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
) -> PrepareReport:
    """Read every NIfTI volume under ``input_dir`` and write a train/validation ``DatasetDict``.

    Unreadable files are skipped and reported by name with the reason. The output appears
    atomically (built in a temporary sibling directory, then renamed); inputs are only read.

    Raises:
        FileNotFoundError: ``input_dir`` does not exist.
        ValueError: no NIfTI file found, none usable, or ``output_dir`` exists (without ``overwrite``).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: no such directory")
    if output_dir.exists() and not overwrite:
        raise ValueError(f"{output_dir}: already exists (choose another output or overwrite)")
    files = find_nifti_files(input_dir)
    if not files:
        raise ValueError(f"{input_dir}: no .nii or .nii.gz files found")

    files_by_patient: dict[str, list[Path]] = {}
    for path in files:
        files_by_patient.setdefault(patient_id(path, input_dir), []).append(path)
    train, val = split_patients(list(files_by_patient), val_fraction, max_patients, seed)
    report = PrepareReport(output_dir=output_dir)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    was_disabled = datasets.is_progress_bar_enabled() is False
    if not progress:
        datasets.disable_progress_bars()
    try:
        with tqdm(total=sum(len(files_by_patient[p]) for p in train + val), desc="prepare", unit="volume",
                  disable=not progress) as bar:
            splits = {}
            for split, patients in (("train", train), ("validation", val)):
                split_files = [f for p in patients for f in files_by_patient[p]]
                dataset = _build_split(split, split_files, input_dir, work_dir / "cache", report, bar) if split_files else None
                if dataset is not None:
                    splits[split] = dataset
        report.train_patients = sorted({p for p in train if any(f in report.used_files for f in files_by_patient[p])})
        report.val_patients = sorted({p for p in val if any(f in report.used_files for f in files_by_patient[p])})
        if not report.used_files:
            raise ValueError(f"{input_dir}: none of the {len(report.skipped)} NIfTI file(s) is usable:\n"
                             + "\n".join(reason for _, reason in report.skipped))
        datasets.DatasetDict(splits).save_to_disk(str(work_dir / "dataset"))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(work_dir / "dataset", output_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        if not progress and not was_disabled:
            datasets.enable_progress_bars()
    return report


def _build_split(
    split: str, files: list[Path], input_dir: Path, cache_dir: Path, report: PrepareReport, bar: tqdm
) -> datasets.Dataset | None:
    """One split as an Arrow dataset in ``cache_dir``, written one volume at a time (None if no file is usable)."""
    fingerprint = hashlib.sha256("\n".join([split, *map(str, files)]).encode()).hexdigest()[:32]
    used_before = len(report.used_files)
    try:
        return datasets.Dataset.from_generator(
            _rows,
            features=FEATURES,
            cache_dir=str(cache_dir),
            gen_kwargs={"files": files, "input_dir": input_dir, "report": report, "bar": bar},
            fingerprint=fingerprint,
            writer_batch_size=1,
            split=split,
        )
    except ValueError:
        if len(report.used_files) == used_before:  # every file of this split was skipped: no rows
            return None
        raise


def _rows(files: list[Path], input_dir: Path, report: PrepareReport, bar: tqdm) -> Iterator[dict]:
    for path in files:
        try:
            volume = load_ct(path)
        except (CTFileError, FileNotFoundError) as err:
            report.skipped.append((path, str(err)))
        else:
            report.used_files.append(path)
            hu = volume.hu
            if hu.dtype != np.int16:  # non-integral or out-of-range HU: rounded and clipped to int16
                hu = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
            yield {
                "patient_id": patient_id(path, input_dir),
                "hu": hu.tobytes(),
                "shape": list(hu.shape),
                "spacing": list(volume.spacing),
                "affine": volume.affine.tolist(),
                "source": str(path),
            }
        bar.update(1)
