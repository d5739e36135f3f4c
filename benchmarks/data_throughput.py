"""Data throughput: ``RandomPatchDataset`` vs raw numpy memmap slicing of the same patches.

Writes ``--volumes`` full-size phantoms (default 16 x 604 x 512 x 512, about 5 GB as NIfTI plus
the same as Arrow) into a temporary directory, prepares them (and a dataset of the first
``--rss-volumes``), then measures in fresh subprocesses, each starting with the files evicted
from the page cache (``posix_fadvise(DONTNEED)``):

* ``dataset``: ``RandomPatchDataset[i]`` on the configured sampling path (the position draws,
  each with its foreground probe, at ``dataset.min_foreground_fraction`` of ``--config``, then
  the int16 HU patch copied out of the memory-mapped Arrow buffer), the thing training uses
  (the interleaved measurement below also runs the default path, no foreground steering);
* ``store``: the same final slices copied as int16 (the storage path alone);
* ``raw``: ``np.load(mmap_mode="r")`` of a plain ``.npy`` copy of the same volumes, the same
  final patches copied as int16: the limit on this machine.

Each reads the same patches cold (first read, from disk) and then warm (page cache, best of 3).
The headline ratio, dataset vs raw warm, comes from ``--repeats`` more processes that each read
every patch with the readers in turn and count CPU time (``time.thread_time``), so all see the
same load on a shared machine and time spent descheduled is left out. Besides ``dataset`` and
``raw`` they run ``store``, which separates what the item costs from what reading through
pyarrow's mapping of the Arrow file costs against numpy's memmap. The order of the readers cycles
through all permutations (which reader ran just before matters: a 16.8 MB copy leaves the caches
cold for the next), 12 passes per process; the figure is the median over all passes. It is
measured for both sampling paths, each against the raw copies of its own patches.
"Bytes read per patch" is the kernel's ``read_bytes`` (``/proc/self/io``: bytes fetched from
storage) over the cold pass divided by the number of patches; it includes the kernel's
read-ahead, so it is compared with the patch size, with the bytes the patch spans in the
volume (4 KB pages touched, computed), and with the whole volume a decompress-per-patch
reader would read. Peak RSS (``VmHWM``) and anonymous RSS are taken from ``/proc/self/status``
after reading the same number of patches from ``--rss-volumes`` and from ``--volumes`` volumes.

    python benchmarks/data_throughput.py                              # full size, ~4 min on 2 cores
    python benchmarks/data_throughput.py --volumes 4 --shape 96 128 128 --patch 32 64 64   # quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("dataset", "store", "raw")
SAMPLINGS = ("configured", "default")  # min_foreground_fraction of --config, and 0
INTERLEAVED = ("dataset", "store", "raw")
WARM_PASSES = 12  # twice each order of the three interleaved readers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--rss-volumes", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(604, 512, 512), metavar=("D", "H", "W"))
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 256, 256), metavar=("D", "H", "W"))
    parser.add_argument("--patches", type=int, default=48, help="patches read per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="processes measuring the readers interleaved")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "ctpa_512.yaml"),
                        help="recipe whose dataset.min_foreground_fraction the dataset samples with")
    parser.add_argument("--workdir", default=None, help="parent of the temporary directory (default: system temp)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sampling", default="configured", choices=SAMPLINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    if args.rss_volumes > args.volumes:
        parser.error("--rss-volumes must not exceed --volumes")

    volume_bytes = 2 * math.prod(args.shape)
    needed = volume_bytes * (2 * args.volumes + 2 * args.rss_volumes) * 1.1
    parent = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < needed:
        sys.exit(f"{parent}: {free / 2**30:.1f} GiB free, this run needs about {needed / 2**30:.1f} GiB")
    work = Path(tempfile.mkdtemp(dir=parent, prefix="ctpa_vq_data_bench-"))
    try:
        _run(args, work, volume_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, volume_bytes: int) -> None:
    from tqdm.auto import tqdm

    from ctpa_vq.data.phantom import write_phantom_nifti
    from ctpa_vq.data.prepare import prepare_dataset

    start = time.perf_counter()
    nifti, nifti_small = work / "nifti", work / "nifti_small"
    nifti_small.mkdir(parents=True)
    for i in tqdm(range(args.volumes), desc="write phantoms", unit="volume"):
        path = write_phantom_nifti(nifti / f"phantom_{i:03d}.nii", args.shape, seed=i)
        if i < args.rss_volumes:
            (nifti_small / path.name).symlink_to(path)
    prepare_dataset(nifti, work / "ds_all", val_fraction=0.0)
    prepare_dataset(nifti_small, work / "ds_small", val_fraction=0.0)
    shutil.rmtree(nifti)
    setup = _spawn(args, "setup", work / "ds_small", work)
    os.sync()  # written pages must be clean before they can be evicted
    print(f"setup (write, prepare, raw copies): {time.perf_counter() - start:.0f} s")

    results = {mode: _spawn(args, mode, work / "ds_small", work) for mode in MODES}
    interleaved = {sampling: [_spawn(args, "interleaved", work / "ds_small", work, sampling)
                              for _ in range(args.repeats)] for sampling in SAMPLINGS}
    rss = {n: _spawn(args, "dataset", work / d, work) for n, d in
           ((args.rss_volumes, "ds_small"), (args.volumes, "ds_all"))}

    patch_bytes = 2 * math.prod(args.patch)
    _report(args, results, interleaved, rss, setup, patch_bytes, volume_bytes)


def _report(args, results, interleaved, rss, setup, patch_bytes, volume_bytes) -> None:
    print(f"\nshape {tuple(args.shape)} (D, H, W) int16, patch {tuple(args.patch)}, {args.patches} patches "
          f"from {args.rss_volumes} volumes; {os.cpu_count()} CPU cores")
    print(f"{'reader':<12}{'cold p/s':>10}{'cold MB/s':>11}{'warm p/s':>10}{'warm MB/s':>11}"
          f"{'read/patch':>12}{'vs raw (warm)':>15}")
    raw_warm = results["raw"]["warm_s"]
    for mode, r in results.items():
        n = args.patches
        print(f"{mode:<12}{n / r['cold_s']:>10.1f}{n * patch_bytes / r['cold_s'] / 1e6:>11.0f}"
              f"{n / r['warm_s']:>10.1f}{n * patch_bytes / r['warm_s'] / 1e6:>11.0f}"
              f"{r['read_bytes'] / n / 1e6:>10.1f}MB{raw_warm / r['warm_s']:>15.2f}")
    print(f"(MB/s counts the int16 HU bytes of the patch: {patch_bytes / 1e6:.1f} MB, what every reader hands out; "
          f"the dataset samples with min_foreground_fraction {setup['min_foreground_fraction']} of {args.config})")
    print(f"bytes per patch: patch {patch_bytes / 1e6:.1f} MB, spanned pages {setup['touched_bytes'] / 1e6:.1f} MB, "
          f"read from disk (cold, with read-ahead) dataset {results['dataset']['read_bytes'] / args.patches / 1e6:.1f}"
          f" MB vs raw {results['raw']['read_bytes'] / args.patches / 1e6:.1f} MB, whole volume "
          f"{volume_bytes / 1e6:.0f} MB")
    for n, r in rss.items():
        print(f"dataset over {n:>3} volumes: peak RSS {r['vm_hwm'] / 2**20:.0f} MiB, anonymous "
              f"{r['rss_anon'] / 2**20:.0f} MiB, file-backed {r['rss_file'] / 2**20:.0f} MiB (after {args.patches} patches)")
    small, large = rss.values()
    print(f"RSS ratio {args.volumes} / {args.rss_volumes} volumes: peak {large['vm_hwm'] / small['vm_hwm']:.2f}, "
          f"anonymous {large['rss_anon'] / small['rss_anon']:.2f}")
    for sampling, runs in interleaved.items():
        fraction = setup["min_foreground_fraction"] if sampling == "configured" else 0.0
        print(f"{sampling} sampling path (min_foreground_fraction {fraction}), item by item, CPU time:")
        passes = [p for run in runs for p in run["passes"]]
        for reader, limit in (("dataset", "raw"), ("store", "raw"), ("dataset", "store")):
            ratios = sorted(p[limit] / p[reader] for p in passes)
            per_process = ", ".join(f"{statistics.median(p[limit] / p[reader] for p in run['passes']):.2f}"
                                    for run in runs)
            print(f"  {reader} warm rate / {limit} warm rate: median {statistics.median(ratios):.2f} over "
                  f"{len(ratios)} passes in {len(runs)} processes (range {ratios[0]:.2f}-{ratios[-1]:.2f}; "
                  f"per process {per_process})")
        fastest = min(passes, key=lambda p: p["raw"])
        print(f"  fastest pass: dataset {args.patches / fastest['dataset']:.0f}, "
              f"store {args.patches / fastest['store']:.0f}, raw {args.patches / fastest['raw']:.0f} patches/s")
    print(f"separate processes: warm {raw_warm / results['dataset']['warm_s']:.2f}, "
          f"cold {results['raw']['cold_s'] / results['dataset']['cold_s']:.2f}; "
          f"store (storage path) / raw warm: {raw_warm / results['store']['warm_s']:.2f}")


def _spawn(args: argparse.Namespace, mode: str, data: Path, work: Path, sampling: str = "configured") -> dict:
    command = [sys.executable, __file__, "--child", mode, "--sampling", sampling, "--data", str(data),
               "--workdir", str(work), "--shape", *map(str, args.shape), "--patch", *map(str, args.patch),
               "--patches", str(args.patches), "--config", args.config]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _child(args: argparse.Namespace) -> dict:
    from ctpa_vq.data.patch_dataset import VolumeStore

    work, data = Path(args.workdir), Path(args.data)
    raw_dir = work / "raw"
    if args.child == "setup":
        store = VolumeStore.from_disk(data)
        raw_dir.mkdir(exist_ok=True)
        for i in range(len(store)):
            np.save(raw_dir / f"{i}.npy", store.volume(i))
        for sampling in SAMPLINGS:
            dataset = _patch_dataset(store, args, sampling)
            origins = [dataset.patch_origin(i) for i in range(args.patches)]
            (work / f"origins_{sampling}.json").write_text(json.dumps(origins))
        dataset = _patch_dataset(store, args, "configured")
        return {"touched_bytes": _spanned_page_bytes(store.shapes[0], dataset.patch_origin(0)[1], args.patch),
                "min_foreground_fraction": dataset.min_foreground_fraction}

    for path in list(data.rglob("*.arrow")) + list(raw_dir.glob("*.npy")):
        _evict(path)
    origins = [(v, tuple(o)) for v, o in json.loads((work / f"origins_{args.sampling}.json").read_text())]

    def timed_pass(read) -> float:
        start = time.perf_counter()
        for i in range(args.patches):
            read(i)
        return time.perf_counter() - start

    if args.child == "interleaved":
        # Warm only, item by item and in CPU time: the readers see the same machine load, and
        # time spent descheduled on a shared machine is not counted. The order cycles through
        # all permutations, so each reader follows each other one equally often.
        readers = {mode: _reader(mode, args, data, raw_dir, origins) for mode in INTERLEAVED}
        for read in readers.values():
            timed_pass(read)  # warms the page cache
        orders = list(itertools.permutations(readers))
        passes = []
        for n in range(WARM_PASSES):
            spent = dict.fromkeys(readers, 0.0)
            for i in range(args.patches):
                for mode in orders[n % len(orders)]:
                    start = time.thread_time()
                    readers[mode](i)
                    spent[mode] += time.thread_time() - start
            passes.append(spent)
        return {"passes": passes}

    read = _reader(args.child, args, data, raw_dir, origins)
    read_bytes_before = _proc_io()["read_bytes"]
    timings = {"cold_s": timed_pass(read), "read_bytes": _proc_io()["read_bytes"] - read_bytes_before}
    timings["warm_s"] = min(timed_pass(read) for _ in range(3))  # best of 3: the machine is shared
    status = _proc_status()
    return {**timings, "vm_hwm": status["VmHWM"], "rss_anon": status["RssAnon"], "rss_file": status["RssFile"]}


def _reader(mode: str, args: argparse.Namespace, data: Path, raw_dir: Path, origins: list):
    """Item i of the measured reader: the dataset draws its own positions, the others read `origins`."""
    from ctpa_vq.data.patch_dataset import VolumeStore

    if mode == "dataset":
        dataset = _patch_dataset(VolumeStore.from_disk(data), args, args.sampling)
        return lambda i: dataset[i]["hu"]
    if mode == "store":
        store = VolumeStore.from_disk(data)
        return lambda i: np.array(store.volume(origins[i][0])[_slices(origins[i][1], args.patch)])
    volumes = [np.load(raw_dir / f"{i}.npy", mmap_mode="r") for i in range(len(list(raw_dir.glob("*.npy"))))]
    return lambda i: np.array(volumes[origins[i][0]][_slices(origins[i][1], args.patch)])


def _patch_dataset(store, args, sampling: str):
    from ctpa_vq.data.patch_dataset import RandomPatchDataset
    from ctpa_vq.training.config import load_config

    per_volume = math.ceil(args.patches / len(store))
    fraction = load_config(args.config).dataset.min_foreground_fraction if sampling == "configured" else 0.0
    return RandomPatchDataset(store, tuple(args.patch), patches_per_volume=per_volume, seed=0,
                              min_foreground_fraction=fraction)


def _slices(origin, size) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(origin, size))


def _spanned_page_bytes(shape, origin, patch, page: int = 4096) -> int:
    """Bytes of the distinct 4 KB pages a C-order int16 patch touches in its volume."""
    depth, height, width = shape
    d = np.arange(origin[0], origin[0] + patch[0])[:, None]
    h = np.arange(origin[1], origin[1] + patch[1])[None, :]
    row_start = 2 * ((d * height + h) * width + origin[2])
    first, last = row_start // page, (row_start + 2 * patch[2] - 1) // page
    pages = np.unique(np.concatenate([np.arange(f, l + 1) for f, l in zip(first.ravel(), last.ravel())]))
    return int(pages.size * page)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


if __name__ == "__main__":
    main()
