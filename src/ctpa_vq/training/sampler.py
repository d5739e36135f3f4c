"""Per-epoch shuffling that is seeded, the same on every process, and resumable."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of `range(num_items)` drawn from `(seed, epoch)` alone.

    Every process draws the same permutation (Accelerate's batch-sampler sharding then hands
    each process its own batches of it), two runs with one seed see the same order, and a run
    resumed mid-epoch (`skip_first_batches`) continues the same sequence. Call `set_epoch`
    before each epoch (Accelerate's `DataLoader.set_epoch` forwards to it).
    """

    def __init__(self, num_items: int, seed: int = 0) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        return iter(order.tolist())
