"""`ctpa-vq encode`: whole CT volumes -> a `datasets` table of latents, the table a DDPM trains on.

One row per volume (see `FEATURES`): the stitched continuous latents (unscaled, and scaled with
the model's stored `latents_mean` / `latents_std`), the code indices, their shape, the volume's
shape, spacing and canonical affine, its split and a pseudonymous patient id. Latent arrays are
stored flat (C-order); `latents_as_tensor(row)` gives them back as `(C, d, h, w)`.

Output: `OUT/data/shard-*.parquet` plus `OUT/encode_info.json` (model, latent statistics, patch
settings); `load_encoded(OUT)` (or `datasets.load_dataset("parquet", data_dir=OUT/"data")`) reads it.

- Written as it goes: each volume becomes a row group of the open shard; a shard is renamed into
  place (atomically) after `volumes_per_shard` volumes, so a crash loses only the open shard.
- Resumable: volumes whose `volume_id` is in a finished shard are skipped.
- Memory: one volume (as float32) plus its latents; the volume is read when it is encoded.
- Distributed: under `accelerate launch` each process encodes every `num_processes`-th remaining
  volume on its own device and writes its own shards.

Privacy: `patient_id` is a pseudonym (`ctpa_vq.data.privacy`'s keyed hash, as `ctpa-vq prepare`
stores it) and `volume_id` a hash of the volume's pseudonymous source (needed to resume); no file
name or path reaches the table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.nifti import CTFileError
from ..utils.atomic import atomic_path

SHARD_GLOB = "shard-*.parquet"
INFO_FILE = "encode_info.json"

SCHEMA = pa.schema([
    ("volume_id", pa.string()),
    ("patient_id", pa.string()),
    ("split", pa.string()),
    ("latents", pa.large_list(pa.float32())),  # (C, d, h, w) flattened, unscaled `encode` latents
    ("latents_scaled", pa.large_list(pa.float32())),  # the same, `scale_latents`: what the DDPM learns
    ("indices", pa.large_list(pa.int32())),  # (d, h, w) flattened code indices of the quantised latents
    ("latent_shape", pa.list_(pa.int32(), 4)),  # (C, d, h, w)
    ("volume_shape", pa.list_(pa.int32(), 3)),  # (D, H, W) in canonical orientation
    ("spacing", pa.list_(pa.float64(), 3)),  # mm along (D, H, W)
    ("affine", pa.list_(pa.list_(pa.float64(), 4), 4)),  # canonical RAS affine (nibabel convention)
])


@dataclass
class VolumeToEncode:
    """One volume to encode; `read` loads it only when its turn comes."""

    volume_id: str
    patient_id: str  # as stored: pseudonymous
    split: str
    read: Callable[[], tuple[np.ndarray, Sequence[float], np.ndarray]]  # -> (hu (D, H, W), spacing, affine)


@dataclass
class EncodeReport:
    """What one process did: volumes encoded, skipped (already encoded) and failed (their errors)."""

    encoded: int
    skipped: int
    seconds: float
    output_dir: Path
    failed: list[str] = field(default_factory=list)

    @property
    def volumes_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def volume_id(origin: str) -> str:
    """A stable id for resuming, from a volume's (pseudonymous) source."""
    return hashlib.sha256(origin.encode()).hexdigest()[:24]


def default_pseudonymise() -> Callable[[str], str]:
    """Identifier -> its keyed-hash pseudonym (`ctpa_vq.data.privacy`, the key `prepare` uses), key loaded on first use."""
    from ..data.privacy import PseudonymKey

    key = functools.cache(PseudonymKey.load)
    return lambda identifier: key().pseudonym(identifier)


def list_volumes(
    source: str | os.PathLike, splits: Sequence[str] | None = None, pseudonymise: Callable[[str], str] | None = None
) -> list[VolumeToEncode]:
    """The volumes of a prepared dataset (`ctpa-vq prepare`; `splits`, default all) or of a folder of
    volumes (NIfTI, NRRD, MetaImage, DICOM series; as `prepare` finds them).

    A prepared dataset's ids are stored as `prepare` wrote them (pseudonyms unless it kept
    identifiers); a folder's patient ids and paths go through `pseudonymise` (default: the keyed
    hash with the user's key, as `prepare` does), so both give the same ids for the same data.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder (expected a prepared dataset or a folder of volumes)")
    if (source / "dataset_dict.json").is_file() or (source / "dataset_info.json").is_file():
        return _prepared_volumes(source, splits)
    if splits:
        raise ValueError(f"{source}: --split applies to a prepared dataset, this is a folder of volumes")
    return _folder_volumes(source, pseudonymise or default_pseudonymise())


def _prepared_volumes(source: Path, splits: Sequence[str] | None) -> list[VolumeToEncode]:
    import datasets

    from ..data.patch_dataset import VolumeStore

    loaded = datasets.load_from_disk(str(source))
    available = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    missing = [s for s in splits or () if s not in available]
    if missing:
        raise ValueError(f"{source}: no split(s) {missing} (has {sorted(available)})")
    volumes = []
    for split in splits or sorted(available):
        store = VolumeStore(available[split])
        origins = store.dataset.data.table.column("source").to_pylist()
        for index, origin in enumerate(origins):
            read = (lambda s=store, i=index: (s.volume(i), s.spacings[i], s.affine(i)))
            volumes.append(VolumeToEncode(volume_id(f"{split}\0{origin}"), store.patient_ids[index], split, read))
    return volumes


def _folder_volumes(source: Path, pseudonymise: Callable[[str], str]) -> list[VolumeToEncode]:
    from ..data.prepare import patient_id
    from ..data.volume_io import input_volumes

    found = input_volumes(source)

    def reader(item):
        def read():
            volume = item.load()
            return volume.hu, volume.spacing, volume.affine
        return read

    return [
        VolumeToEncode(volume_id(pseudonymise(os.path.relpath(item.name, source))),
                       pseudonymise(patient_id(item.path, source)), "", reader(item))
        for item in found
    ]


def encoded_ids(output_dir: str | os.PathLike) -> set[str]:
    """`volume_id`s in the finished shards under `output_dir/data`."""
    ids: set[str] = set()
    for shard in sorted((Path(output_dir) / "data").glob(SHARD_GLOB)):
        ids.update(pq.read_table(shard, columns=["volume_id"]).column("volume_id").to_pylist())
    return ids


def _one_flat_row(tensor: torch.Tensor, dtype) -> pa.LargeListArray:
    """A one-row list column holding `tensor` flattened (C order), without a Python list in between."""
    values = pa.array(tensor.reshape(-1).numpy().astype(dtype, copy=False))
    return pa.LargeListArray.from_arrays(pa.array([0, len(values)], type=pa.int64()), values)


def _row(source: VolumeToEncode, hu, spacing, affine, latents: torch.Tensor, scaled: torch.Tensor,
         indices: torch.Tensor) -> pa.Table:
    columns = {
        "volume_id": pa.array([source.volume_id]),
        "patient_id": pa.array([source.patient_id]),
        "split": pa.array([source.split]),
        "latents": _one_flat_row(latents, np.float32),
        "latents_scaled": _one_flat_row(scaled, np.float32),
        "indices": _one_flat_row(indices, np.int32),
        "latent_shape": pa.array([list(latents.shape)], type=SCHEMA.field("latent_shape").type),
        "volume_shape": pa.array([list(hu.shape)], type=SCHEMA.field("volume_shape").type),
        "spacing": pa.array([[float(s) for s in spacing]], type=SCHEMA.field("spacing").type),
        "affine": pa.array([np.asarray(affine, dtype=np.float64).tolist()], type=SCHEMA.field("affine").type),
    }
    return pa.table(columns, schema=SCHEMA)


class _ShardWriter:
    """Row groups into a temporary file beside `shard-<name>.parquet`, renamed into place
    (`ctpa_vq.utils.atomic.atomic_path`: flushed to disk, then renamed) when full or closed."""

    def __init__(self, data_dir: Path, rank: int, volumes_per_shard: int) -> None:
        self.data_dir, self.rank, self.capacity = data_dir, rank, volumes_per_shard
        self.writer: pq.ParquetWriter | None = None
        self.shard = ExitStack()  # holds the open shard's `atomic_path`
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            name = f"shard-r{self.rank:03d}-{uuid.uuid4().hex[:12]}.parquet"
            self.writer = pq.ParquetWriter(self.shard.enter_context(atomic_path(self.data_dir / name)), SCHEMA)
        self.writer.write_table(table)
        self.rows += 1
        if self.rows >= self.capacity:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.shard.close()  # renames the finished shard into place
            self.writer, self.rows = None, 0


def encode_dataset(
    model: str | os.PathLike,
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    splits: Sequence[str] | None = None,
    patch_size: Sequence[int] | None = None,
    overlap: float | int | None = None,
    max_patch_voxels: int | None = None,
    batch_size: int = 1,
    volumes_per_shard: int = 16,
    progress: bool = True,
    pseudonymise: Callable[[str], str] | None = None,
) -> EncodeReport:
    """Encode every volume of `source` not yet in `output_dir` (see the module docstring).

    Runs in every process of an `accelerate launch`; each takes its share. Needs the model's latent
    statistics (`ctpa-vq latent-stats`), since the scaled latents are what the DDPM trains on.
    The patch grid is the pipeline's (`patch_grid`: planned per volume unless `patch_size` is given).
    A volume that cannot be read is reported in `failed` (its error names it) and the run goes on.
    `pseudonymise`: see `list_volumes`.
    """
    from accelerate import PartialState

    from ..pipelines import load_reconstruction_pipeline

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: CPU processes join over gloo
    output_dir = Path(output_dir)
    data_dir = output_dir / "data"
    pipe = load_reconstruction_pipeline(model)
    if pipe.vqgan.config.latents_mean is None or pipe.vqgan.config.latents_std is None:
        raise ValueError(f"{model}: the model has no latents_mean/latents_std; run `ctpa-vq latent-stats` first")
    pipe.to(state.device)
    pipe.set_progress_bar_config(disable=True)
    options = dict(patch_size=patch_size, overlap=overlap, max_patch_voxels=max_patch_voxels, batch_size=batch_size)

    volumes = list_volumes(source, splits, pseudonymise)
    if state.is_main_process:
        data_dir.mkdir(parents=True, exist_ok=True)
        for stale in data_dir.glob(f".{SHARD_GLOB}.*"):  # unfinished shards of a killed run (any world size)
            stale.unlink()
    state.wait_for_everyone()
    done = encoded_ids(output_dir)
    state.wait_for_everyone()  # every process has listed the same finished shards before any writes more
    todo = [v for v in volumes if v.volume_id not in done]
    mine = todo[state.process_index :: state.num_processes]

    writer = _ShardWriter(data_dir, state.process_index, volumes_per_shard)
    failed = []
    start = time.perf_counter()
    try:
        for volume in tqdm(mine, desc=f"encode (process {state.process_index})", unit="volume",
                           disable=not (progress and state.is_local_main_process)):
            try:
                hu, spacing, affine = volume.read()
            except (CTFileError, FileNotFoundError) as err:  # the others are still worth encoding
                failed.append(str(err))
                continue
            latents = pipe.encode_volume(hu, **options, spacing=spacing, name=volume.patient_id)
            _, indices = pipe.quantize_latents(latents)
            scaled = pipe.vqgan.scale_latents(latents)
            writer.write(_row(volume, hu, spacing, affine, latents[0], scaled[0], indices[0]))
            del hu, latents, indices, scaled
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if state.is_main_process:
        _write_info(output_dir, pipe, model, options)
    return EncodeReport(encoded=len(mine) - len(failed), skipped=len(volumes) - len(todo), seconds=seconds,
                        output_dir=output_dir, failed=failed)


def _write_info(output_dir: Path, pipe, model, options: dict) -> None:
    config = pipe.vqgan.config
    model_name = str(model)
    info = {
        "model": model_name if not Path(model_name).is_absolute() else Path(model_name).name,
        "ctpa_vq_version": __version__,
        "hu_window": list(config.hu_window),
        "downsample_factor": list(config.downsample_factor),
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
        "num_codes": int(pipe.vqgan.quantizer.num_codes),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    }
    with atomic_path(output_dir / INFO_FILE) as temporary:
        temporary.write_text(json.dumps(info, indent=2) + "\n")


def load_encoded(output_dir: str | os.PathLike, split: str | None = None, **kwargs):
    """The encoded table as a `datasets.Dataset` (optionally one prepared split); kwargs go to `load_dataset`.

    `datasets` converts the Parquet shards to an Arrow cache (`cache_dir`, default the HF datasets
    cache) the first time; pass `streaming=True` to iterate the shards without that copy.
    """
    import datasets

    data_dir = Path(output_dir) / "data"
    if not list(data_dir.glob(SHARD_GLOB)):
        raise FileNotFoundError(f"{data_dir}: no encoded shards (run `ctpa-vq encode` first)")
    dataset = datasets.load_dataset("parquet", data_files=str(data_dir / SHARD_GLOB), split="train", **kwargs)
    return dataset.filter(lambda name: name == split, input_columns="split") if split is not None else dataset


def latents_as_tensor(row: dict, column: str = "latents_scaled") -> torch.Tensor:
    """A row's flat latents (`latents`, `latents_scaled`) as a `(C, d, h, w)` float32 tensor."""
    return torch.as_tensor(np.asarray(row[column], dtype=np.float32)).reshape(tuple(row["latent_shape"]))
