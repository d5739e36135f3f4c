"""Per-channel latent statistics for the downstream DDPM, stored in the model's config.

A diffusion model wants inputs of roughly unit variance. The statistics are measured on the
continuous latents `encode` returns for real volumes (whole volumes, patch-wise, as the DDPM will
see them), accumulated in float64 with Chan's parallel update so any number of voxels is exact
enough, and written to `latents_mean` / `latents_std` in the model's `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.dicom import SkippedSeries
from ..data.volume_io import input_volumes
from ..hub.model_source import local_model
from ..utils.atomic import atomic_path


@dataclass
class LatentStats:
    """Per-channel mean and standard deviation of latents, over `count` latent voxels per channel."""

    mean: list[float]
    std: list[float]
    count: int
    skipped: list[str] = field(default_factory=list)  # series that are no CT volume (localizer, ...), why


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

    The weights do not change, so only the config is rewritten (`ctpa_vq.utils.atomic.atomic_path`):
    a crash leaves either the old or the new config.
    """
    config_path = Path(model_path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: model config does not exist")
    model.register_to_config(latents_mean=stats.mean, latents_std=stats.std)
    with atomic_path(config_path) as temporary:
        model.to_json_file(temporary)


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
    from ..pipelines import load_reconstruction_pipeline

    source = local_model(model_dir)  # latent-stats rewrites a local model's config
    volumes = [volume for item in inputs for volume in input_volumes(item)]
    pipe = load_reconstruction_pipeline(source)
    pipe.set_progress_bar_config(disable=True)
    options = dict(patch_size=patch_size, overlap=overlap, max_patch_voxels=max_patch_voxels)
    skipped: list[str] = []

    def read_all() -> Iterator[np.ndarray]:
        for volume in tqdm(volumes, desc="latent stats", unit="volume", disable=not progress):
            try:
                yield volume.load().hu
            except SkippedSeries as err:  # a localizer, ...: not a CT volume, as `prepare` skips it
                skipped.append(str(err))

    stats = compute_latent_stats(lambda hu: pipe.encode_volume(hu, **options), read_all())
    write_latent_stats(pipe.vqgan, stats, source.model_path)
    return replace(stats, skipped=skipped)
