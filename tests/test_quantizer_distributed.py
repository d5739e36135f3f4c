"""Under torch.distributed (2 CPU processes, gloo) every replica holds the same codebook."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctpa_vq.models import EMAVectorQuantizer


def _replica(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)  # different data and different restart draws per rank
        quantizer = EMAVectorQuantizer(num_codes=64, code_dim=4, decay=0.9, dead_code_threshold=0.5).train()
        for _ in range(6):
            quantizer(torch.randn(2, 4, 3, 4, 4) * (rank + 1) + rank)
        torch.save(quantizer.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replicas_hold_identical_codebooks(tmp_path):
    mp.spawn(_replica, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("embedding", "cluster_size", "embed_sum", "initialized"):
        assert torch.equal(states[0][key], states[1][key]), key
    # The codebook really moved with data from both ranks (not just the initial copy).
    assert states[0]["cluster_size"].sum() > 0
    assert bool(states[0]["initialized"])


def _single_process_quantizer(seed: int) -> EMAVectorQuantizer:
    torch.manual_seed(seed)
    quantizer = EMAVectorQuantizer(num_codes=64, code_dim=4, decay=0.9, dead_code_threshold=0.5).train()
    for _ in range(6):
        quantizer(torch.randn(2, 4, 3, 4, 4))
    return quantizer


def test_without_synchronisation_codebooks_would_differ():
    """Guards the test above: different data alone does produce different codebooks."""
    a, b = _single_process_quantizer(100), _single_process_quantizer(101)
    assert not torch.equal(a.embedding, b.embedding)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4)])
def test_fsq_indices_round_trip(levels):
    from ctpa_vq.models import FiniteScalarQuantizer

    fsq = FiniteScalarQuantizer(levels)
    z = torch.randn(2, len(levels), 3, 4, 5) * 3
    out = fsq(z)
    assert out.indices.min() >= 0 and out.indices.max() < fsq.num_codes
    assert torch.equal(fsq.indices_to_codes(out.indices), out.z_q)
    every_index = torch.arange(fsq.num_codes).view(1, -1, 1, 1)
    codes = fsq.indices_to_codes(every_index)  # (1, C, K, 1, 1): every code is distinct and maps back
    assert torch.unique(codes.flatten(2), dim=2).shape[2] == fsq.num_codes
    assert torch.equal(fsq._codes_to_indices(codes.permute(0, 2, 3, 4, 1)), every_index)
