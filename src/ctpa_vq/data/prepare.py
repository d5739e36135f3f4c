"""``prepare``: a folder of CT volumes -> a ``datasets.DatasetDict`` on disk, in resumable shards.

Inputs are NIfTI, NRRD/MetaImage files and DICOM series folders (:mod:`.volume_io`). Every
volume is read in canonical RAS, (D, H, W), optionally resampled to a target spacing
(:mod:`.resample`), and stored as one row: its int16 HU bytes plus shape, spacing, affine,
the shape and spacing it had before resampling, a patient id and a source name. The Arrow files
are memory-mapped on reading, which lets :mod:`ctpa_vq.data.patch_dataset` read one patch
without reading the volume.

Patient ids: a file (or DICOM series folder) directly in the input directory is its own patient
(its name without the format suffix); one in a sub-directory belongs to the patient named by the
first sub-directory (``input/patient07/scan_a.nii.gz`` -> ``patient07``).

Split: by patient, decided for each patient alone from a hash of its id and the seed
(:func:`patient_split`: validation when the hash, as a number in [0, 1), is below
``val_fraction``), so processes and machines preparing different patients agree without seeing
each other. On a small collection the fraction is approximate; if no patient lands in validation
(with ``val_fraction > 0`` and two or more patients) the one with the smallest hash goes there, if
all do the largest stays in train. A split with no usable volume is not written.

Shards and resuming: patients, sorted by id, are cut into shards of ``patients_per_shard``; each
shard is written as it is prepared (:mod:`.prepare_shards`). A re-run skips every finished shard
and, since shard contents depend only on the listing and the settings, gives the same rows in the
same order as an uninterrupted run, whatever the number of processes.

Parallel: ``num_proc`` worker processes prepare whole shards (each reads, converts and writes its
own volumes: memory is about ``num_proc`` volumes). Across machines: ``shard=(i, n)`` prepares
every ``n``-th shard, and under ``accelerate launch`` each process takes its share
(``RANK``/``WORLD_SIZE``); the index that makes the shards a dataset is written by the process that
sees every shard finished (:func:`combine_parts` joins parts prepared into different folders).

Privacy: by default the dataset holds pseudonyms (:mod:`ctpa_vq.data.privacy`), never a patient id or
a path: ``patient_id`` is the keyed hash of the patient id and ``source`` that of the path relative
to the input directory. Only geometry and HU reach the dataset from a DICOM file. The manifests
and ``prepare_report.json`` in the output hold the same pseudonyms, never a path.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .dicom import SkippedSeries, find_series, is_dicom_file
from .nifti import CTFileError
from .prepare_shards import (
    FEATURES,
    PLAN_FILE,
    REPORT_FILE,
    SHARDS_DIR,
    DatasetIndex,
    ShardWriter,
    link_or_copy,
    read_manifests,
    row_batch,
    shard_name,
    write_index,
    write_json,
)
from .hub_input import fetched, is_hub_path, list_hub_entries
from .privacy import PseudonymKey
from .resample import resample, resampled_affine
from .series_selection import select_series
from .volume_io import INPUT_KINDS, VOLUME_SUFFIXES, VolumeSource, find_volumes, load_volume

__all__ = ["FEATURES", "PrepareReport", "combine_parts", "patient_id", "patient_split", "prepare_dataset",
           "split_patients"]

_POLL_SECONDS = 2.0  # how often a process waiting for other processes' shards looks at the manifests


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did: which patients went where, which volumes were skipped and why.

    Patients are listed as stored in the dataset (pseudonyms unless identifiers were kept).
    ``used_files`` and the paths in ``skipped`` are this run's (so they can be found and fixed;
    paths are never stored); volumes of shards finished by an earlier run or another process
    count in ``volumes`` and their skipped inputs appear under their stored source name.
    """

    output_dir: Path
    train_patients: list[str] = field(default_factory=list)
    val_patients: list[str] = field(default_factory=list)
    used_files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)
    target_spacing: tuple[float, float, float] | None = None
    volumes: int = 0  # in the dataset, all shards
    resumed_shards: int = 0  # finished before this run
    finished: bool = True  # False for one part of a --shard run: the index is written by combine_parts

    def summary(self) -> str:
        resampled = f", resampled to {_mm(self.target_spacing)} mm" if self.target_spacing else ""
        resumed = f"; {self.resumed_shards} shard(s) were already done" if self.resumed_shards else ""
        where = self.output_dir if self.finished else f"{self.output_dir} (a part: combine the parts when all are done)"
        lines = [
            f"used {self.volumes} volume(s) of {len(self.train_patients) + len(self.val_patients)} patient(s) "
            f"(train {len(self.train_patients)}, validation {len(self.val_patients)}){resampled}; "
            f"skipped {len(self.skipped)}{resumed} -> {where}"
        ]
        lines += [f"  skipped {name}: {reason}" if not str(reason).startswith(str(name)) else f"  skipped {reason}"
                  for name, reason in self.skipped]
        return "\n".join(lines)


def patient_id(path: Path, input_dir: Path) -> str:
    """The patient a volume belongs to (see the module docstring)."""
    parts = path.relative_to(input_dir).parts
    return _without_suffix(parts[0] if parts else input_dir.name)  # no parts: DICOM files directly in input_dir


def _without_suffix(name: str) -> str:
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) from ``parts`` (SHA-256), the same on every machine and Python."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def patient_split(patient: str, val_fraction: float, seed: int = 0) -> str:
    """``"validation"`` when the patient's seeded hash is below ``val_fraction``, else ``"train"``."""
    return "validation" if _unit_hash("ctpa-vq split", seed, patient) < val_fraction else "train"


def split_patients(
    patients: Sequence[str], val_fraction: float, max_patients: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, val) patient lists by :func:`patient_split`, with the small-collection fallback of the
    module docstring; ``max_patients`` keeps the patients with the smallest seeded hash (another one)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = sorted(set(patients))
    if max_patients is not None:
        if max_patients < 1:
            raise ValueError(f"max_patients must be at least 1, got {max_patients}")
        order = sorted(sorted(order, key=lambda p: _unit_hash("ctpa-vq subset", seed, p))[:max_patients])
    val = [p for p in order if patient_split(p, val_fraction, seed) == "validation"]
    by_hash = sorted(order, key=lambda p: _unit_hash("ctpa-vq split", seed, p))
    if order and len(val) == len(order):  # at least one patient stays in train
        val = by_hash[:-1]
    elif val_fraction > 0 and len(order) >= 2 and not val:
        val = by_hash[:1]
    chosen = set(val)
    return [p for p in order if p not in chosen], sorted(val)


@dataclass(frozen=True)
class _Patient:
    """One patient's inputs: top-level entries of the input folder (paths relative to it)."""

    patient: str  # the identifier, as derived from the path
    split: str
    entries: tuple[str, ...]


@dataclass(frozen=True)
class _ShardJob:
    """Everything a worker process needs to prepare one shard (pickled to it)."""

    index: int
    plan_id: str
    input_dir: str
    output_dir: str
    patients: tuple[_Patient, ...]
    target_spacing: tuple[float, float, float] | None
    key: PseudonymKey | None  # None: keep identifiers
    all_series: bool  # keep every DICOM series of a study (else one: .series_selection)

    def stored(self, identifier: str) -> str:
        return identifier if self.key is None else self.key.pseudonym(identifier)


@dataclass
class _ShardResult:
    """What a shard's worker did: paths for this run's report, pseudonymous entries for the manifest."""

    index: int
    used: list[str] = field(default_factory=list)  # paths
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    patients: list[dict] = field(default_factory=list)  # manifest: {"patient", "split", "volumes"}
    volumes: list[dict] = field(default_factory=list)  # manifest: {"source", "split", "bytes"}
    skipped_stored: list[dict] = field(default_factory=list)  # manifest: {"source", "kind", "problem"}

    def skip(self, path: Path, message: str, stored_source: str, kind: str, problem: str) -> None:
        self.skipped.append((str(path), message))
        self.skipped_stored.append({"source": stored_source, "kind": kind, "problem": problem})


def list_patients(input_dir: Path | str) -> dict[str, list[str]]:
    """Patient id -> its top-level entries under ``input_dir`` (a folder, or ``hf://datasets/...``): one
    listing of the top level, no volume read. Folders and volume files are entries; so are loose DICOM
    files (their patient is the input folder's name)."""
    if is_hub_path(input_dir):
        root_name = str(input_dir).rstrip("/").rsplit("/", 1)[-1]
        listing = [(name, folder, name.lower().endswith(".dcm")) for name, folder in list_hub_entries(str(input_dir))]
    else:
        root_name = Path(input_dir).name
        listing = [(entry.name, entry.is_dir(), not entry.is_dir() and is_dicom_file(entry.path))
                   for entry in os.scandir(input_dir)]
    patients: dict[str, list[str]] = {}
    for name, folder, loose_dicom in sorted(listing):
        if folder or name.endswith(VOLUME_SUFFIXES) or loose_dicom:
            patients.setdefault(root_name if loose_dicom else _without_suffix(name), []).append(name)
    return patients


def _patient_volumes(input_dir: Path, entries: Sequence[str]) -> list[VolumeSource]:
    """The volumes of one patient's entries, sorted by name (as :func:`find_volumes` lists them)."""
    sources, loose_dicom = [], []
    for entry in entries:
        path = input_dir / entry
        if path.is_dir():
            sources += find_volumes(path, read_dicom_whole=True)  # each DICOM file parsed once
        elif entry.endswith(VOLUME_SUFFIXES):
            sources.append(VolumeSource(str(path), path, lambda path=path: load_volume(path)))
        else:
            loose_dicom.append(path)
    if loose_dicom:  # DICOM files directly in the input folder: the series among them
        from .dicom import load_dicom_series

        sources += [VolumeSource(s.name, input_dir, lambda s=s: load_dicom_series(s), s)
                    for s in find_series(input_dir, loose_dicom, read_whole=True)]
    return sorted(sources, key=lambda s: s.name)


_progress_queue = None  # set in worker processes: where they report each volume


def _init_worker(progress_queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def prepare_shard(job: _ShardJob, on_volume: Callable[[int], None] | None = None) -> _ShardResult:
    """Read, convert and write every volume of one shard, then its manifest (which marks it finished)."""
    report = on_volume or (lambda nbytes: _progress_queue.put(("volume", nbytes)) if _progress_queue else None)
    output_dir = Path(job.output_dir)
    shards_dir = output_dir / SHARDS_DIR
    for stale in shards_dir.glob(f".{shard_name(job.index)}.json.*"):
        stale.unlink(missing_ok=True)
    writer = ShardWriter(output_dir, job.index)
    result = _ShardResult(job.index)
    try:
        for patient in job.patients:
            with _local(job.input_dir, patient.entries) as input_dir:
                kept = _prepare_patient(job, patient, input_dir, writer, result, report)
            if kept:
                result.patients.append({"patient": job.stored(patient.patient), "split": patient.split, "volumes": kept})
    except BaseException as err:
        writer.close(err)
        raise
    writer.close()
    manifest = {"index": job.index, "plan_id": job.plan_id, "rows": writer.rows, "patients": result.patients,
                "volumes": result.volumes, "skipped": result.skipped_stored}
    write_json(shards_dir / f"{shard_name(job.index)}.json", manifest)
    return result


def _local(input_dir: str, entries: Sequence[str]):
    """The folder holding a patient's entries: the input folder itself, or a temporary copy fetched from the Hub."""
    return fetched(input_dir, entries) if is_hub_path(input_dir) else nullcontext(Path(input_dir))


def _prepare_patient(job: _ShardJob, patient: _Patient, input_dir: Path, writer: ShardWriter,
                     result: _ShardResult, report: Callable[[int], None]) -> int:
    """Write one patient's volumes into the shard (recording them in ``result``); return how many were usable."""
    stored_patient, kept = job.stored(patient.patient), 0
    sources = _patient_volumes(input_dir, patient.entries)
    if not job.all_series:
        sources, not_chosen = select_series(sources)
        for source, reason in not_chosen:
            result.skip(source.path, f"{source.name}: {reason}", job.stored(os.path.relpath(source.name, input_dir)),
                        "another series of the study chosen", reason)
    for source in sources:
        stored_source = job.stored(os.path.relpath(source.name, input_dir))
        try:
            volume = source.load()
        except (CTFileError, FileNotFoundError) as err:
            kind = "not a CT volume" if isinstance(err, SkippedSeries) else "unreadable or not a regular grid"
            result.skip(source.path, str(err), stored_source, kind, getattr(err, "problem", type(err).__name__))
            continue
        hu, spacing, affine = _converted(volume, job.target_spacing)
        writer.write(patient.split, row_batch(stored_patient, stored_source, hu, spacing, affine,
                                              volume.shape, volume.spacing))
        result.used.append(str(source.path))
        result.volumes.append({"source": stored_source, "split": patient.split, "bytes": int(hu.nbytes)})
        kept += 1
        report(int(hu.nbytes))
        del volume, hu
    return kept


def _converted(volume, target_spacing):
    """(int16 hu (D, H, W), spacing, affine) as stored: resampled if asked, rounded and clipped to int16."""
    hu, spacing, affine = volume.hu, volume.spacing, volume.affine
    if target_spacing is not None:
        hu = resample(hu, spacing, target_spacing)
        spacing, affine = target_spacing, resampled_affine(affine, volume.spacing, target_spacing)
    if hu.dtype != np.int16:  # resampled, non-integral or out-of-range HU
        hu = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    return hu, spacing, affine


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` / torchrun, else (0, 1).

    Read from the launcher's environment: no process group is needed (and none could time out
    while processes wait hours for each other); processes meet through the shard manifests.
    """
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
    num_proc: int = 1,
    shard: tuple[int, int] | None = None,
    patients_per_shard: int = 8,
    all_series: bool = False,
) -> PrepareReport:
    """Prepare every CT volume under ``input_dir`` into a train/validation ``DatasetDict`` at ``output_dir``.

    Args:
        target_spacing: resample every volume to this (D, H, W) spacing in mm; None keeps each
            volume's own grid.
        keep_identifiers: store patient ids and relative paths as they are instead of pseudonyms.
        key: the pseudonymisation key (default :meth:`PseudonymKey.load`: created on first use).
        num_proc: worker processes, each preparing whole shards.
        shard: ``(i, n)``: prepare only every ``n``-th shard from the ``i``-th (0-based); the
            dataset index is then left to :func:`combine_parts`.
        patients_per_shard: patients per shard (the unit of resuming).
        all_series: keep every DICOM series of a study, not only the one
            :mod:`.series_selection` chooses.

    Unreadable volumes are skipped and reported by name with the reason; inputs are only read.
    A run into an unfinished output of the same inputs and settings resumes it.

    Raises:
        FileNotFoundError: ``input_dir`` does not exist.
        ValueError: no volume found, none usable, bad settings, or ``output_dir`` is finished or
            holds something else (without ``overwrite``).
    """
    input_dir = str(input_dir) if is_hub_path(input_dir) else Path(input_dir)
    output_dir = Path(output_dir)
    if isinstance(input_dir, Path) and not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: no such directory")
    if target_spacing is not None:
        target_spacing = tuple(float(t) for t in target_spacing)
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise ValueError(f"target spacing must be 3 positive values in mm (D, H, W), got {target_spacing}")
    if num_proc < 1 or patients_per_shard < 1:
        raise ValueError(f"num_proc and patients_per_shard must be at least 1, got {num_proc}, {patients_per_shard}")
    part, parts = shard or (0, 1)
    if not 0 <= part < parts:
        raise ValueError(f"shard {part}/{parts}: expected 0 <= I < N")
    rank, world = process_rank()
    if overwrite and world > 1:
        raise ValueError(f"--overwrite with {world} processes: remove {output_dir} first, then launch")
    if not keep_identifiers and key is None:
        key = PseudonymKey.load()

    by_patient = list_patients(input_dir)
    if not by_patient:
        raise ValueError(f"{input_dir}: no volumes found (expected {INPUT_KINDS})")
    train, val = split_patients(list(by_patient), val_fraction, max_patients, seed)
    split_of = {p: "train" for p in train} | {p: "validation" for p in val}
    patients = [_Patient(p, split_of[p], tuple(by_patient[p])) for p in sorted(split_of)]
    chunks = [patients[k:k + patients_per_shard] for k in range(0, len(patients), patients_per_shard)]
    stored = (lambda text: text) if keep_identifiers else key.pseudonym
    plan = {
        "format": 1,
        "patients": len(patients),
        "shards": len(chunks),
        "patients_per_shard": patients_per_shard,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_patients": max_patients,
        "target_spacing": list(target_spacing) if target_spacing else None,
        "keep_identifiers": keep_identifiers,
        "all_series": all_series,
        "key_check": None if keep_identifiers else key.pseudonym("ctpa-vq key check"),
        "patients_digest": hashlib.sha256("\n".join(stored(p.patient) for p in patients).encode()).hexdigest(),
    }
    plan_id = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:24]
    _open_output(output_dir, plan, plan_id, overwrite, writer=rank == 0)

    done = read_manifests(output_dir)
    workers = parts * world
    worker = part * world + rank
    jobs = [_ShardJob(k, plan_id, str(input_dir), str(output_dir), tuple(chunk), target_spacing,
                      None if keep_identifiers else key, all_series)
            for k, chunk in enumerate(chunks) if k % workers == worker and k not in done]
    report = PrepareReport(output_dir=output_dir, target_spacing=target_spacing, resumed_shards=len(done),
                           finished=shard is None)
    mine = {job.index for job in jobs}
    watch = rank == 0 and world > 1  # rank 0 also shows (and waits for) the other processes' shards
    show = progress and rank == 0
    total = sum(len(c) for k, c in enumerate(chunks) if k not in done and (watch or k in mine))
    with tqdm(total=total, desc="prepare", unit="patient", disable=not show) as bar:
        progress_of = _Progress(bar, chunks, set(done), mine)
        for result in _run_jobs(jobs, num_proc, progress_of):
            report.used_files += [Path(p) for p in result.used]
            report.skipped += [(Path(p), reason) for p, reason in result.skipped]
        if shard is not None or rank != 0:  # the index is left to combine_parts, or to rank 0
            report.finished = False
            manifests = read_manifests(output_dir)
            return _summarise(report, manifests, set(manifests))
        manifests = _wait_for_shards(output_dir, len(chunks), progress_of)
    return finish_dataset(input_dir, output_dir, manifests, plan, plan_id, report, mine)


class _Progress:
    """One bar for the run: patients done (ETA), volumes and GB, this process's workers and (for the
    process that waits for the others) the shards other processes finished."""

    def __init__(self, bar: tqdm, chunks: list, done: set[int], mine: set[int]) -> None:
        self.bar, self.chunks, self.seen, self.mine = bar, chunks, set(done), set(mine)
        self.volumes, self.bytes = 0, 0

    def volume(self, nbytes: int) -> None:
        self.volumes += 1
        self.bytes += nbytes
        self.bar.set_postfix_str(f"{self.volumes} volumes, {self.bytes / 1e9:.2f} GB", refresh=False)

    def shard_done(self, index: int) -> None:
        if index not in self.seen:
            self.seen.add(index)
            self.bar.update(len(self.chunks[index]))

    def others(self, manifests: dict[int, dict]) -> None:
        for index, manifest in manifests.items():
            if index not in self.seen and index not in self.mine:  # this process's shards count as they go
                for volume in manifest["volumes"]:
                    self.volume(volume["bytes"])
                self.shard_done(index)


def _run_jobs(jobs: list[_ShardJob], num_proc: int, progress: _Progress):
    """Yield each job's result as it finishes: in this process, or on ``num_proc`` worker processes."""
    if num_proc == 1 or len(jobs) <= 1:
        for job in jobs:
            result = prepare_shard(job, on_volume=progress.volume)
            progress.shard_done(job.index)
            yield result
        return
    # fork: workers start at once, with the modules imported (spawn re-imports torch in each, seconds of
    # CPU and ~0.5 GB apiece); this process has read no volume, so no thread pool state is inherited.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    messages = context.Queue()
    with ProcessPoolExecutor(min(num_proc, len(jobs)), mp_context=context, initializer=_init_worker,
                             initargs=(messages,)) as pool:
        pending = {pool.submit(prepare_shard, job): job for job in jobs}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(messages, progress)
                for future in finished:
                    job = pending.pop(future)
                    result = future.result()  # re-raises a worker's unexpected error
                    progress.shard_done(job.index)
                    yield result
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        _drain(messages, progress)


def _drain(messages, progress: _Progress) -> None:
    while True:
        try:
            _, nbytes = messages.get_nowait()
        except queue.Empty:
            return
        progress.volume(nbytes)


def _wait_for_shards(output_dir: Path, count: int, progress: _Progress) -> dict[int, dict]:
    """The manifests of all ``count`` shards, waiting (polling) for other processes to finish theirs."""
    while True:
        manifests = read_manifests(output_dir)
        progress.others(manifests)
        if len(manifests) >= count:
            return manifests
        time.sleep(_POLL_SECONDS)


def _open_output(output_dir: Path, plan: dict, plan_id: str, overwrite: bool, writer: bool) -> None:
    """Check ``output_dir`` is new, or an unfinished run of this plan; write the plan (``writer``, rank 0),
    or wait for it (the other processes of a launch)."""
    plan_file = output_dir / PLAN_FILE
    if output_dir.exists() and overwrite and writer:
        shutil.rmtree(output_dir)
    while not writer and not plan_file.is_file():  # the other processes of a launch wait for rank 0's plan
        time.sleep(_POLL_SECONDS / 10)
    if (output_dir / "dataset_dict.json").is_file():
        raise ValueError(f"{output_dir}: already exists (choose another output, or pass --overwrite)")
    if plan_file.is_file():
        earlier = json.loads(plan_file.read_text())
        if earlier.get("plan_id") != plan_id:
            differs = sorted(k for k in plan if earlier.get(k) != plan[k])
            raise ValueError(f"{output_dir}: holds a prepare run of other inputs or settings (differs in "
                             f"{', '.join(differs) or 'the plan'}); pass --overwrite to start again, or choose "
                             "another output")
        return
    if output_dir.exists() and any(output_dir.iterdir()) and writer:
        raise ValueError(f"{output_dir}: already exists (choose another output, or pass --overwrite)")
    if writer:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan_file, {"plan_id": plan_id, **plan})
        (output_dir / SHARDS_DIR).mkdir(exist_ok=True)


def finish_dataset(input_name: str | os.PathLike, output_dir: Path, manifests: dict[int, dict], plan: dict,
                   plan_id: str, report: PrepareReport, prepared_here: set[int]) -> PrepareReport:
    """Write ``prepare_report.json`` and the index once every shard is finished (the output is
    removed if no volume is usable)."""
    report = _summarise(report, manifests, prepared_here)
    if not report.volumes:
        shutil.rmtree(output_dir, ignore_errors=True)
        reasons = [reason for _, reason in report.skipped]
        raise ValueError(f"{input_name}: none of the {len(reasons)} volume(s) is usable:\n" + "\n".join(reasons))
    write_json(output_dir / REPORT_FILE, _report_json(manifests, plan))
    write_index(output_dir, DatasetIndex.from_manifests(manifests.values()), plan_id)
    return report


def _summarise(report: PrepareReport, manifests: dict[int, dict], prepared_here: set[int]) -> PrepareReport:
    """Fill the report's dataset-wide fields from the manifests; the skipped inputs of shards not
    prepared here (``prepared_here``: their paths are in the report already) by stored name."""
    patients = [p for m in manifests.values() for p in m["patients"]]
    report.train_patients = sorted({p["patient"] for p in patients if p["split"] == "train"})
    report.val_patients = sorted({p["patient"] for p in patients if p["split"] == "validation"})
    report.volumes = sum(len(m["volumes"]) for m in manifests.values())
    report.skipped += [(s["source"], s["problem"]) for index, m in sorted(manifests.items())
                       if index not in prepared_here for s in m["skipped"]]
    return report


def _report_json(manifests: dict[int, dict], plan: dict) -> dict:
    skipped = [s for index in sorted(manifests) for s in manifests[index]["skipped"]]
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["kind"]] = reasons.get(s["kind"], 0) + 1
    volumes = [v for m in manifests.values() for v in m["volumes"]]
    patients = [p for m in manifests.values() for p in m["patients"]]
    return {
        "prepared": {
            "volumes": len(volumes),
            "gigabytes": round(sum(v["bytes"] for v in volumes) / 1e9, 3),
            "patients": {split: sum(p["split"] == split for p in patients) for split in ("train", "validation")},
            "volumes_per_split": {split: sum(v["split"] == split for v in volumes) for split in ("train", "validation")},
        },
        "skipped": {"count": len(skipped), "by_reason": reasons, "volumes": skipped},
        "settings": {k: plan[k] for k in ("val_fraction", "seed", "max_patients", "target_spacing",
                                          "keep_identifiers", "all_series", "patients_per_shard", "shards")},
    }


def combine_parts(parts: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> PrepareReport:
    """Join the outputs of ``--shard I/N`` runs (same inputs and settings) into one dataset at ``output_dir``.

    Shard files are hard-linked (copied across file systems); ``output_dir`` may be one of the
    parts. Every shard of the plan must be finished in exactly one part.

    Raises:
        ValueError: a part is not a prepare output, parts differ in plan, or shards are missing.
    """
    output_dir = Path(output_dir)
    plans, manifests, where = {}, {}, {}
    for part in map(Path, parts):
        plan_file = part / PLAN_FILE
        if not plan_file.is_file():
            raise ValueError(f"{part}: not a `ctpa-vq prepare` output (no {PLAN_FILE})")
        plans[part] = json.loads(plan_file.read_text())
        for index, manifest in read_manifests(part).items():
            manifests[index], where[index] = manifest, part
    plan_ids = {plan["plan_id"] for plan in plans.values()}
    if len(plan_ids) != 1:
        raise ValueError(f"the parts were prepared from different inputs or settings: {sorted(map(str, plans))}")
    plan = next(iter(plans.values()))
    missing = sorted(set(range(plan["shards"])) - set(manifests))
    if missing:
        raise ValueError(f"{len(missing)} of {plan['shards']} shard(s) are not finished in any part "
                         f"({', '.join(shard_name(i) for i in missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                         "finish (re-run) those parts first")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        (output_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        write_json(output_dir / PLAN_FILE, plan)
    elif not (output_dir / PLAN_FILE).is_file() or json.loads((output_dir / PLAN_FILE).read_text()) != plan:
        raise ValueError(f"{output_dir}: already exists and is not a part of this run (choose another output)")
    for index, manifest in manifests.items():
        source = where[index]
        if source.resolve() == output_dir.resolve():
            continue
        for split, rows in manifest["rows"].items():
            if rows:
                name = f"{shard_name(index)}.arrow"
                link_or_copy(source / split / name, output_dir / split / name)
        write_json(output_dir / SHARDS_DIR / f"{shard_name(index)}.json", manifest)
    report = PrepareReport(output_dir=output_dir, target_spacing=tuple(plan["target_spacing"] or ()) or None)
    return finish_dataset(output_dir, output_dir, manifests, plan, plan["plan_id"], report, set())


def _mm(spacing: Sequence[float]) -> str:
    return " x ".join(f"{s:g}" for s in spacing)

