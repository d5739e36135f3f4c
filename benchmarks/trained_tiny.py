"""A `tiny` VQGAN3D trained for a few hundred steps on phantoms, cached outside the repo.

Seams and reconstruction routes only show on a model that has learnt something: a random
model's output is noise. `trained_tiny()` trains one on random (32, 64, 64) patches of
phantoms (L1 + commitment, AdamW, the demo's learning rate) on first use and saves it under
`~/.cache/ctpa-vq-benchmarks/` (override with CTPA_VQ_BENCH_CACHE); later calls load it.

    python benchmarks/trained_tiny.py --steps 300      # train (or load) and print the cache path
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctpa_vq import VQGAN3D
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.models.intensity import hu_to_unit
from ctpa_vq.utils.atomic import atomic_folder

PATCH = (32, 64, 64)


def cache_dir() -> Path:
    return Path(os.environ.get("CTPA_VQ_BENCH_CACHE", Path.home() / ".cache" / "ctpa-vq-benchmarks"))


def trained_tiny(steps: int = 300, seed: int = 0) -> VQGAN3D:
    """The trained model (eval mode), training it on first use."""
    folder = cache_dir() / f"tiny-{steps}-steps-seed{seed}"
    if (folder / "config.json").is_file():
        return VQGAN3D.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    model = VQGAN3D.from_preset("tiny").train()
    window = tuple(model.config.hu_window)
    volumes = [hu_to_unit(make_phantom((64, 128, 128), seed=seed + i), window) for i in range(6)]
    volumes = [torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in volumes]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(steps):
        batch = []
        for _ in range(2):
            volume = volumes[rng.integers(len(volumes))]
            o = [int(rng.integers(0, s - p + 1)) for s, p in zip(volume.shape, PATCH)]
            batch.append(volume[o[0] : o[0] + PATCH[0], o[1] : o[1] + PATCH[1], o[2] : o[2] + PATCH[2]])
        x = torch.stack(batch)[:, None]
        out = model(x)
        loss = F.l1_loss(out.sample, x) + out.commitment_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    with atomic_folder(folder) as partial:
        model.save_pretrained(partial)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trained_tiny(args.steps, args.seed)
    print(cache_dir() / f"tiny-{args.steps}-steps-seed{args.seed}")
