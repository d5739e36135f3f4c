"""Per-channel latent statistics for the downstream DDPM, stored in the model's config.

A diffusion model wants inputs of roughly unit variance. The statistics are measured on the
continuous latents `encode` returns for real volumes (whole volumes, patch-wise, as the DDPM will
see them), accumulated in float64 with Chan's parallel update so any number of voxels is exact
enough, and written to `latents_mean` / `latents_std` in the model's `config.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.dicom import is_dicom_file
from .data.nifti import CTVolume
from .data.volume_io import INPUT_KINDS, find_volumes, load_volume


@dataclass
class LatentStats:
    """Per-channel mean and standard deviation of latents, over `count` latent voxels per channel."""

    mean: list[float]
    std: list[float]
    count: int


class RunningChannelStats:
    """Streaming per-channel mean/variance of `(C, ...)` or `(B, C, ...)` tensors (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of squared deviations from the mean

    def update(self, latents: torch.Tensor) -> None:
        z = latents.detach().to(torch.float64)
        z = z.unsqueeze(0) if z.ndim == 4 else z
        if z.ndim != 5:
            raise ValueError(f"latents must be (C, d, h, w) or (B, C, d, h, w), got shape {tuple(latents.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or Inf values")
        per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
        n = per_channel.shape[1]
        mean = per_channel.mean(dim=1).cpu().numpy()
        m2 = ((per_channel - per_channel.mean(dim=1, keepdim=True)) ** 2).sum(dim=1).cpu().numpy()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"latents have {mean.shape[0]} channels, earlier ones had {self.mean.shape[0]}")
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self) -> LatentStats:
        if self.mean is None or self.count < 2:
            raise ValueError("need at least two latent voxels to compute statistics")
        std = np.sqrt(self.m2 / (self.count - 1))
        if (std <= 0).any():
            raise ValueError(f"a latent channel is constant (std {std.tolist()}); the model is degenerate")
        return LatentStats(self.mean.tolist(), std.tolist(), self.count)


def compute_latent_stats(
    encode_volume: Callable[[np.ndarray], torch.Tensor], volumes: Iterable[np.ndarray]
) -> LatentStats:
    """Encode each HU volume `(D, H, W)` with `encode_volume` (-> `(C, d, h, w)` or `(1, C, d, h, w)`)
    and return the per-channel statistics over all of them."""
    running = RunningChannelStats()
    for volume in volumes:
        running.update(encode_volume(volume))
    return running.result()


def write_latent_stats(model, stats: LatentStats, model_path: str | Path) -> None:
    """Set `latents_mean` / `latents_std` on `model` and rewrite `model_path/config.json` atomically.

    The weights do not change, so only the config is rewritten: `save_config` into a temporary
    folder beside it, then one `os.replace`, so a crash leaves either the old or the new config.
    """
    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path / 'config.json'}: model config does not exist")
    model.register_to_config(latents_mean=stats.mean, latents_std=stats.std)
    with tempfile.TemporaryDirectory(dir=model_path, prefix=".latent-stats-") as tmp:
        model.save_config(tmp)
        json.loads((Path(tmp) / "config.json").read_text())  # what we swap in must parse
        os.replace(Path(tmp) / "config.json", model_path / "config.json")


def volume_readers(inputs: Sequence[str | Path]) -> list[Callable[[], CTVolume]]:
    """A reader per volume named in `inputs`: files and DICOM series folders as given, other folders
    expanded to the volumes under them (NIfTI, NRRD, MetaImage, DICOM series; sorted)."""
    readers: list[Callable[[], CTVolume]] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"{item}: no such file or folder")
        if item.is_dir() and not any(is_dicom_file(p) for p in item.iterdir() if p.is_file()):
            found = find_volumes(item)
            if not found:
                raise FileNotFoundError(f"{item}: no volumes in this folder (expected {INPUT_KINDS})")
            readers.extend(source.load for source in found)
        else:
            readers.append(partial(load_volume, item))
    return readers


def compute_and_store_latent_stats(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    patch_size: Sequence[int] | None = None,
    overlap: float | int | None = None,
    max_patch_voxels: int | None = None,
    progress: bool = True,
) -> LatentStats:
    """What `ctpa-vq latent-stats` does: encode every input volume whole (patch-wise on the pipeline's
    grid, as `encode_volume` gives them to the DDPM), then store the statistics in the model folder's config
    (`model_dir/config.json`, or `model_dir/vqgan/config.json` for a saved pipeline)."""
    from .pipelines import load_reconstruction_pipeline

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder does not exist (latent-stats rewrites a local model)")
    readers = volume_readers(inputs)
    pipe = load_reconstruction_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    model_path = model_dir / "vqgan" if (model_dir / "model_index.json").is_file() else model_dir
    options = dict(patch_size=patch_size, overlap=overlap, max_patch_voxels=max_patch_voxels)
    volumes = (read().hu for read in tqdm(readers, desc="latent stats", unit="volume", disable=not progress))
    stats = compute_latent_stats(lambda hu: pipe.encode_volume(hu, **options), volumes)
    write_latent_stats(pipe.vqgan, stats, model_path)
    return stats
