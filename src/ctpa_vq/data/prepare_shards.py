"""The on-disk layout of a prepared dataset written in shards, and turning finished shards into the dataset.

A ``prepare`` output folder ``OUT`` holds::

    OUT/prepare_plan.json            what the run prepares (settings, shard count); written first
    OUT/shards/shard-000012.json     a shard's manifest: its patients, volumes and skipped inputs
    OUT/train/shard-000012.arrow     the shard's rows of each split (Arrow IPC stream, one row
    OUT/validation/shard-000012.arrow    per record batch; absent when the shard has none)
    OUT/dataset_dict.json, OUT/<split>/state.json, dataset_info.json   the index, written last
    OUT/prepare_report.json          prepared / skipped counts and reasons

A shard's Arrow files are written atomically (:func:`~ctpa_vq.utils.atomic.atomic_path`) and its manifest
after them, so a manifest means a finished shard and a re-run skips it. The index is exactly what
``Dataset.save_to_disk`` writes (``state.json`` lists the split's files, in shard order), so
``datasets.load_from_disk(OUT)`` opens the shards where they lie, memory-mapped, with no copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import datasets
import numpy as np
import pyarrow as pa

from ..utils.atomic import atomic_path
from ..utils.direct_io import DirectFile

PLAN_FILE = "prepare_plan.json"
REPORT_FILE = "prepare_report.json"
SHARDS_DIR = "shards"
SPLITS = ("train", "validation")

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
SCHEMA = FEATURES.arrow_schema


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def write_json(path: Path, payload: dict) -> None:
    """``payload`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n")


def row_batch(patient: str, source: str, hu: np.ndarray, spacing, affine, source_shape, source_spacing
              ) -> pa.RecordBatch:
    """One dataset row; ``hu`` (D, H, W) int16 goes in without a copy (its buffer backs the column)."""
    hu = np.ascontiguousarray(hu)
    values = pa.py_buffer(hu)
    offsets = pa.py_buffer(np.array([0, hu.nbytes], dtype=np.int64))
    columns = [
        pa.array([patient], pa.string()),
        pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, values]),
        pa.array([list(hu.shape)], SCHEMA.field("shape").type),
        pa.array([[float(s) for s in spacing]], SCHEMA.field("spacing").type),
        pa.array([np.asarray(affine, dtype=np.float64).tolist()], SCHEMA.field("affine").type),
        pa.array([source], pa.string()),
        pa.array([list(source_shape)], SCHEMA.field("source_shape").type),
        pa.array([[float(s) for s in source_spacing]], SCHEMA.field("source_spacing").type),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


class ShardWriter:
    """The Arrow files of one shard, one per split, each opened on its first row and renamed into
    place (flushed to disk) on :meth:`close`; on an error nothing of the shard is left."""

    def __init__(self, output_dir: Path, index: int) -> None:
        self.output_dir, self.name = output_dir, shard_name(index)
        self._open: dict[str, tuple] = {}  # split -> (atomic_path context, DirectFile, stream writer)
        self.rows = {split: 0 for split in SPLITS}

    def write(self, split: str, batch: pa.RecordBatch) -> None:
        if split not in self._open:
            folder = self.output_dir / split
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(f".{self.name}.arrow.*"):  # left by a killed run of this shard
                stale.unlink(missing_ok=True)
            context = atomic_path(folder / f"{self.name}.arrow")
            file = DirectFile(context.__enter__())  # write-once GBs: past the page cache
            self._open[split] = (context, file, pa.ipc.new_stream(file, SCHEMA))
        self._open[split][2].write_batch(batch)
        self.rows[split] += 1

    def close(self, error: BaseException | None = None) -> None:
        """Finish (``error`` None) or discard every open file."""
        for context, file, writer in self._open.values():
            writer.close()
            file.close()
            if error is None:
                context.__exit__(None, None, None)
            else:
                context.__exit__(type(error), error, error.__traceback__)
        self._open.clear()


def read_manifests(output_dir: Path) -> dict[int, dict]:
    """Finished shards under ``output_dir``: index -> manifest."""
    manifests = {}
    for path in sorted((output_dir / SHARDS_DIR).glob("shard-*.json")):
        manifest = json.loads(path.read_text())
        manifests[int(manifest["index"])] = manifest
    return manifests


@dataclass
class DatasetIndex:
    """Which shard files make each split, in shard order."""

    files: dict[str, list[str]]  # split -> file names in the split's folder
    rows: dict[str, int]

    @classmethod
    def from_manifests(cls, manifests: Iterable[dict]) -> "DatasetIndex":
        files: dict[str, list[str]] = {split: [] for split in SPLITS}
        rows = {split: 0 for split in SPLITS}
        for manifest in sorted(manifests, key=lambda m: m["index"]):
            for split, count in manifest["rows"].items():
                if count:
                    files[split].append(f"{shard_name(manifest['index'])}.arrow")
                    rows[split] += count
        return cls({s: f for s, f in files.items() if f}, {s: n for s, n in rows.items() if n})


def write_index(output_dir: Path, index: DatasetIndex, plan_id: str) -> None:
    """The files ``datasets.load_from_disk`` reads, as ``save_to_disk`` writes them; ``dataset_dict.json`` last."""
    for split, files in index.files.items():
        info = datasets.DatasetInfo(features=FEATURES)
        state = {
            "_data_files": [{"filename": name} for name in files],
            "_fingerprint": hashlib.sha256(f"{plan_id}\0{split}".encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": split,
        }
        with atomic_path(output_dir / split / "dataset_info.json") as temporary, open(temporary, "wb") as file:
            info._dump_info(file, pretty_print=True)
        write_json(output_dir / split / "state.json", state)
    write_json(output_dir / "dataset_dict.json", {"splits": list(index.files)})


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` holding ``source``'s bytes: a hard link (no copy) on the same file system, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)
