"""Patches from a prepared dataset, read straight from the memory-mapped Arrow files.

:class:`VolumeStore` gives each volume of a split as a read-only ``(D, H, W)`` int16 numpy
view into the memory-mapped Arrow buffer (no copy, no decompression). Slicing a patch out of
that view touches only the pages under the patch, so reading one patch reads about one patch
of bytes, and resident memory does not grow with the number of volumes.

:class:`RandomPatchDataset` (training) sits on top: item ``i`` is a patch of volume
``i % n_volumes`` at a position drawn from ``(seed, epoch)`` alone, the same in any process,
worker or resumed run for the same index and epoch (the loop's sampler shuffles the indices
per epoch and Accelerate shards them across processes). Whole-volume evaluation goes
through the pipeline's planned grid instead.

Items are ``hu``: the patch as stored, a contiguous int16 HU tensor (1, pd, ph, pw). Copying
it out of the memory map is nearly the whole cost of an item (the positions are drawn once per
epoch, a position's foreground probe reads about 1/30 of the patch's pages); the HU window and
the float conversion (:func:`~ctpa_vq.models.intensity.hu_to_unit`) happen on the GPU inside the
training step, on half the bytes a float32 batch would move. Volumes smaller than the training
patch are an error naming the patient, raised when the dataset is built: a patch that is mostly
padding would teach the model the padding.
"""

from __future__ import annotations

import os
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch


Shape3 = tuple[int, int, int]


class VolumeStore:
    """Zero-copy ``(D, H, W)`` int16 views of the volumes of one prepared split.

    Args:
        dataset: a split written by :func:`~ctpa_vq.data.prepare.prepare_dataset`.
    """

    def __init__(self, dataset: datasets.Dataset) -> None:
        if dataset._indices is not None:  # select()/shuffle() views: materialise the row order
            dataset = dataset.flatten_indices()
        self.dataset = dataset
        table = dataset.data.table
        self.patient_ids: list[str] = table.column("patient_id").to_pylist()
        self.shapes: list[Shape3] = [tuple(s) for s in table.column("shape").to_pylist()]
        self.spacings: list[tuple[float, float, float]] = [tuple(s) for s in table.column("spacing").to_pylist()]
        self._hu_chunks = table.column("hu").chunks
        self._chunk_starts = np.cumsum([0] + [len(c) for c in self._hu_chunks])
        self._views: dict[int, np.ndarray] = {}

    @classmethod
    def from_disk(cls, path: str | os.PathLike, split: str = "train") -> VolumeStore:
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path}: no split {split!r} (has {sorted(dataset)})")
            dataset = dataset[split]
        return cls(dataset)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getstate__(self) -> dict:  # pickle the dataset (by file), never the Arrow buffers
        return {"dataset": self.dataset}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dataset"])

    def volume(self, index: int) -> np.ndarray:
        """Read-only (D, H, W) int16 view of volume ``index`` into the memory-mapped buffer."""
        if index in self._views:
            return self._views[index]
        chunk_index = int(np.searchsorted(self._chunk_starts, index, side="right")) - 1
        chunk: pa.LargeBinaryArray = self._hu_chunks[chunk_index]
        row = chunk.offset + index - int(self._chunk_starts[chunk_index])
        _, offsets, data = chunk.buffers()
        begin, end = np.frombuffer(offsets, dtype=np.int64, count=2, offset=8 * row)
        shape = self.shapes[index]
        if end - begin != 2 * np.prod(shape):
            raise ValueError(f"volume {self.patient_ids[index]!r}: {end - begin} bytes do not hold int16 {shape}")
        view = np.frombuffer(data, dtype=np.int16, count=(end - begin) // 2, offset=int(begin)).reshape(shape)
        view.flags.writeable = False
        self._views[index] = view
        return view

    def affine(self, index: int) -> np.ndarray:
        """The canonical 4x4 affine of volume ``index`` (nibabel convention, (x, y, z) = (w, h, d))."""
        return np.asarray(self.dataset.data.table.column("affine")[index].as_py())


class RandomPatchDataset(torch.utils.data.Dataset):
    """Random training patches, ``patches_per_volume`` per volume per epoch.

    Item ``i`` comes from volume ``i % len(volumes)``; its candidate origins are row ``i`` of a
    table drawn once per epoch from a generator seeded with ``(seed, epoch)``. With
    ``min_foreground_fraction > 0`` up to ``max_draws`` positions are tried and the first whose
    fraction of voxels above ``foreground_hu`` reaches it is used (else the first with the most
    foreground), which steers patches away from air.
    The fraction is estimated on a sparse probe of each candidate (:meth:`_foreground_fraction`)
    that touches about 1/30 of the patch's pages, so trying a position costs little reading.

    Call :meth:`set_epoch` on the dataset itself at each epoch, before iterating (it draws the
    epoch's table, which DataLoader workers then inherit): Accelerate's ``DataLoader.set_epoch``
    forwards to the dataset only when the sampler has no ``set_epoch`` (not with
    ``shuffle=True``), and ``persistent_workers`` would keep a stale epoch.

    Args:
        volumes: the split to draw from.
        patch_size: (pd, ph, pw) voxels.
        patches_per_volume: patches per volume per epoch.
        seed: base seed of the positions.
        min_foreground_fraction: fraction in [0, 1] of foreground voxels wanted per patch.
        foreground_hu: HU above which a voxel counts as foreground (not air).
        max_draws: positions tried per item when steering away from air.
    """

    def __init__(
        self,
        volumes: VolumeStore,
        patch_size: Sequence[int] = (128, 256, 256),
        patches_per_volume: int = 8,
        seed: int = 0,
        min_foreground_fraction: float = 0.0,
        foreground_hu: float = -500.0,
        max_draws: int = 8,
    ) -> None:
        self.volumes = volumes
        self.patch_size: Shape3 = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (D, H, W), got {tuple(patch_size)}")
        if patches_per_volume < 1 or max_draws < 1 or not 0.0 <= min_foreground_fraction <= 1.0:
            raise ValueError("patches_per_volume and max_draws must be >= 1, min_foreground_fraction in [0, 1]")
        if len(volumes) == 0:
            raise ValueError("the dataset has no volumes")
        for patient, shape in zip(volumes.patient_ids, volumes.shapes):
            if any(s < p for s, p in zip(shape, self.patch_size)):
                raise ValueError(
                    f"patient {patient!r}: volume {shape} (D, H, W) is smaller than the patch {self.patch_size}; "
                    "use a smaller patch_size or leave this patient out"
                )
        self.patches_per_volume = patches_per_volume
        self.seed = seed
        self.min_foreground_fraction = min_foreground_fraction
        self.foreground_hu = foreground_hu
        self.max_draws = max_draws
        self.epoch = 0
        self._candidates = self._draw_candidates()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._candidates = self._draw_candidates()

    def _draw_candidates(self) -> np.ndarray:
        """(len, draws, 3) candidate origins of every item of the epoch, drawn from ``(seed, epoch)``.

        One vectorised draw per epoch (in the process that calls :meth:`set_epoch`, so DataLoader
        workers inherit it) instead of a seeded generator per item: building a generator costs
        more than the rest of the item outside the copy.
        """
        draws = self.max_draws if self.min_foreground_fraction > 0 else 1
        shapes = np.asarray(self.volumes.shapes, dtype=np.int64)
        highs = (shapes - np.asarray(self.patch_size))[np.arange(len(self)) % len(self.volumes)] + 1
        rng = np.random.default_rng([self.seed, self.epoch])
        candidates = rng.integers(0, highs[:, None, :], size=(len(self), draws, 3))
        candidates.flags.writeable = False
        return candidates

    def __len__(self) -> int:
        return len(self.volumes) * self.patches_per_volume

    def patch_origin(self, index: int) -> tuple[int, Shape3]:
        """(volume index, (d, h, w) origin) of item ``index`` in the current epoch."""
        volume_index, origin = self._choose(index)
        return volume_index, tuple(origin.tolist())

    def _choose(self, index: int) -> tuple[int, np.ndarray]:
        """(volume index, its row of the epoch's candidates: the (3,) int64 origin) of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"patch index {index} out of range [0, {len(self)})")
        volume_index = index % len(self.volumes)
        candidates = self._candidates[index]
        if len(candidates) == 1:
            return volume_index, candidates[0]
        fractions = []
        for k, origin in enumerate(candidates.tolist()):
            fraction = self._foreground_fraction(volume_index, origin)
            if fraction >= self.min_foreground_fraction:
                return volume_index, candidates[k]
            fractions.append(fraction)
        return volume_index, candidates[int(np.argmax(fractions))]  # the first with the most foreground

    def _foreground_fraction(self, volume_index: int, origin: Shape3) -> float:
        """Foreground fraction on a sparse probe: 8 slices x 16 image rows, every 4th voxel of a row.

        A row segment lies in one or two 4 KB pages, so the probe reads about 128-256 pages
        (0.5-1 MB) wherever the patch lies, against the patch's 16.8 MB at 128x256x256; the
        estimate is within a few percent of the patch's fraction (enough to steer away from air).
        """
        (d, h, w), (pd, ph, pw) = origin, self.patch_size
        probe = self.volumes.volume(volume_index)[d:d + pd:max(1, pd // 8), h:h + ph:max(1, ph // 16), w:w + pw:4]
        return np.count_nonzero(probe > self.foreground_hu) / probe.size

    def __getitem__(self, index: int) -> dict:
        volume_index, origin = self._choose(index)
        patch = self.volumes.volume(volume_index)[_slices(origin.tolist(), self.patch_size)]
        return {
            "hu": torch.from_numpy(np.array(patch)[None]),  # one copy out of the memory map
            "patient_id": self.volumes.patient_ids[volume_index],
            "index": index,
            "volume_index": volume_index,
            "origin": torch.from_numpy(origin.copy()),  # (3,) int64; cheaper than torch.tensor(tuple)
        }


def _slices(origin: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(origin, size))
