"""``ctpa-vq prepare`` throughput: ours vs just reading the same files with the same reader, 2 processes vs 1.

Writes ``--dicom`` synthetic DICOM CT series (``--slices`` slices of ``--size`` x ``--size``, uint16 with
a rescale, one slice per file, pydicom) and ``--nifti`` ``.nii.gz`` volumes of the same shape (nibabel),
from a few phantoms, into ``--work`` (kept for re-runs). Then, in one run, alternating ``--repeats``
times so every reader sees the same load on a shared machine:

* ``read``: the reader alone, doing nothing else: ``np.asanyarray(nib.load(f).dataobj)`` per NIfTI
  file, ``pydicom.dcmread(f).pixel_array`` per DICOM slice;
* ``load_volume``: how ``prepare`` reads, patient by patient (its ``_patient_volumes``, then each
  volume's ``load``: ISA-L's gzip decoder under nibabel, pydicom's parser with our own pixel and
  geometry reads, the slice-grid checks and the reorientation), writing nothing: what the writing
  costs on top;
* ``prepare``: ``prepare_dataset`` with ``num_proc=1`` (in this process, start-up excluded), the
  whole command's work: read, order and check the slices, reorient, convert, write the shards and
  the manifests, flushed to disk (fsync), and the index;
* ``prepare x2``: the same with ``num_proc=2`` (worker processes).

Every reader reads from the page cache, and the machine's memory is touched once before the timed
runs (``warm_memory``: on a fresh VM, backing untouched pages made writing 8x dearer).

Per-volume times are CPU seconds (this process's, plus its children's for ``x2``) where the ratio is
per process, and wall seconds for the 2-vs-1 ratio; the median over the repeats is reported. The
projections for a 32-core node scale the measured per-core time per voxel to the collection's volume
size (RSPECT: 7,279 studies of about 250 x 512 x 512; CT-RATE: 50,188 volumes, assumed 300 x 512 x 512)
and assume 32 processes scale as 2 did; reading from the Hub or a network file system adds its own bound.
System time and minor page faults are printed beside the CPU time: writing costs system time.

    nice -n 10 python benchmarks/prepare.py                                    # 200 + 200 volumes
    python benchmarks/prepare.py --dicom 8 --nifti 8 --slices 32 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the DICOM writer the tests use

from dicom_series import write_series  # noqa: E402

from ctpa_vq.data.phantom import make_phantom  # noqa: E402
from ctpa_vq.data.prepare import _patient_volumes, list_patients, prepare_dataset  # noqa: E402
from ctpa_vq.data.privacy import PseudonymKey  # noqa: E402
from ctpa_vq.utils.allocator import keep_freed_memory  # noqa: E402

COLLECTIONS = {"RSPECT (DICOM)": ("dicom", 7279, 250 * 512 * 512), "CT-RATE (NIfTI)": ("nifti", 50188, 300 * 512 * 512)}


def make_inputs(work: Path, dicom: int, nifti: int, slices: int, size: int) -> tuple[Path, Path]:
    """The DICOM and NIfTI folders (written once; a marker file records their sizes)."""
    marker = work / "inputs.json"
    wanted = {"dicom": dicom, "nifti": nifti, "slices": slices, "size": size}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return work / "dicom", work / "nifti"
    shutil.rmtree(work, ignore_errors=True)
    phantoms = [make_phantom((slices, size, size), seed=s) for s in range(4)]
    for k in range(dicom):
        write_series(work / "dicom" / f"study{k:04d}", phantoms[k % 4], pixel_spacing=(0.7, 0.7), shuffle=False)
    (work / "nifti").mkdir(parents=True)
    for k in range(nifti):
        image = nib.Nifti1Image(phantoms[k % 4].transpose(2, 1, 0), np.diag([0.7, 0.7, 1.5, 1.0]))
        nib.save(image, work / "nifti" / f"volume{k:04d}.nii.gz")
    marker.write_text(json.dumps(wanted))
    return work / "dicom", work / "nifti"


def warm_memory(share: float = 0.7) -> float:
    """Touch ``share`` of the available memory once, then free it; seconds taken.

    On a fresh VM a page the guest has never touched costs the hypervisor a fault to back: writing
    8 MB of a new file measured 17-20 ms of CPU here before this and 2.1 ms after (with the pages
    the kernel recycles anyway). That is a cost of a freshly booted machine, not of ``prepare``,
    and it would fall on the runs that write (the readers read a warm page cache)."""
    start = time.perf_counter()
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    chunks = [np.ones(1 << 30, dtype=np.uint8) for _ in range(int(available * share) >> 30)]
    del chunks
    return time.perf_counter() - start


def read_only(folder: Path, kind: str) -> None:
    """Every volume with the reader alone."""
    for entry in sorted(folder.iterdir()):
        if kind == "nifti":
            np.asanyarray(nib.load(entry).dataobj)
        else:
            for path in sorted(entry.iterdir()):
                pydicom.dcmread(path).pixel_array


def read_as_prepare(folder: Path) -> None:
    """Every volume as ``prepare`` reads it, patient by patient (each patient's files found, then each
    volume loaded), writing nothing."""
    for entries in list_patients(folder).values():
        for source in _patient_volumes(folder, entries):
            source.load()


def _usage() -> np.ndarray:
    """(user s, system s, minor page faults) of this process and its children so far."""
    return sum(np.array([u.ru_utime, u.ru_stime, u.ru_minflt], dtype=float)
               for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(run) -> tuple[float, float, float, float]:
    """(wall s, CPU s, of which system s, minor page faults) of ``run()``, this process and its children."""
    wall, before = time.perf_counter(), _usage()
    run()
    user, system, faults = _usage() - before
    return time.perf_counter() - wall, user + system, system, faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", type=int, default=200)
    parser.add_argument("--nifti", type=int, default=200)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ctpa_vq_bench_prepare"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Before keep_freed_memory: its chunks must go back to the kernel when freed, not stay in this
    # process's heap (which would leave the runs 70% less memory for the page cache).
    print(f"memory warmed in {warm_memory():.0f} s", flush=True)
    keep_freed_memory()  # as `ctpa-vq prepare` runs (the command calls it), for every run alike

    dicom_dir, nifti_dir = make_inputs(args.work, args.dicom, args.nifti, args.slices, args.size)
    key = PseudonymKey.load(args.work / "bench.key")
    counts = {"dicom": args.dicom, "nifti": args.nifti}
    folders = {"dicom": dicom_dir, "nifti": nifti_dir}
    times: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}  # (kind, run) -> timed()s
    for _ in range(args.repeats):
        for kind, folder in folders.items():
            read_only(folder, kind)  # warm the page cache: every reader reads from memory
            runs = {
                "read": lambda: read_only(folder, kind),
                "load_volume": lambda: read_as_prepare(folder),
                "prepare": lambda: prepare_dataset(folder, args.work / "out", val_fraction=0.2, progress=False,
                                                   key=key),
                "prepare x2": lambda: prepare_dataset(folder, args.work / "out", val_fraction=0.2, progress=False,
                                                      key=key, num_proc=2),
            }
            for name, run in runs.items():
                shutil.rmtree(args.work / "out", ignore_errors=True)  # freeing the last output's pages is not timed
                times.setdefault((kind, name), []).append(timed(run))

    voxels = args.slices * args.size * args.size
    print(f"{args.dicom} DICOM series and {args.nifti} NIfTI (.nii.gz) volumes of {args.slices} x {args.size} x "
          f"{args.size}; median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'input':6} {'run':11} {'wall ms/vol':>12} {'CPU ms/vol':>11} {'system':>7} {'faults/vol':>11}")
    result = {}
    for (kind, name), samples in times.items():
        wall, cpu, system, faults = (statistics.median(sample[i] for sample in samples) / counts[kind] for i in range(4))
        result[(kind, name)] = (wall * 1e3, cpu * 1e3)
        print(f"{kind:6} {name:11} {wall * 1e3:12.1f} {cpu * 1e3:11.1f} {system * 1e3:7.1f} {faults:11.0f}")
    for kind in folders:
        read, ours, two = result[(kind, "read")], result[(kind, "prepare")], result[(kind, "prepare x2")]
        own = result[(kind, "load_volume")]
        print(f"{kind}: prepare per process {read[1] / ours[1]:.2f}x the plain reader's rate (CPU; wall "
              f"{read[0] / ours[0]:.2f}x), {own[1] / ours[1]:.2f}x that of its own reading (load_volume, CPU); "
              f"2 processes {ours[0] / two[0]:.2f}x one (wall)")
    for collection, (kind, volumes, collection_voxels) in COLLECTIONS.items():
        seconds_per_volume = result[(kind, "prepare")][1] / 1e3 * collection_voxels / voxels
        hours = volumes * seconds_per_volume / 32 / 3600
        print(f"{collection}: {seconds_per_volume:.2f} CPU s per volume -> {hours:.1f} h on a 32-core node "
              f"(--num-proc 32)")


if __name__ == "__main__":
    main()
