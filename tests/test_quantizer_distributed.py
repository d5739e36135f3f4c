"""Under torch.distributed (2 CPU processes, gloo): dead codes restart identically on every
replica, and 2 processes with B samples each equal 1 process with 2B, also when one process's
batch holds a non-finite latent."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctpa_vq.models import EMAVectorQuantizer


THRESHOLD, DECAY, STEPS, SHIFT_AT = 0.3, 0.8, 14, 4
NON_FINITE = {(2, 1): float("nan"), (SHIFT_AT + 1, 0): float("inf")}  # (step, rank): one latent's channel 0


def _data(step: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s batch at `step`: near the origin, then far away (codes starve and restart)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    shift = 6.0 if step >= SHIFT_AT else 0.0
    z = torch.randn(2, 4, 3, 4, 4, generator=g) * (rank + 1) + rank + shift
    if (step, rank) in NON_FINITE:
        z[1, 0, 2, 3, 1] = NON_FINITE[step, rank]
    return z


def _quantizer() -> EMAVectorQuantizer:
    return EMAVectorQuantizer(num_codes=64, code_dim=4, decay=DECAY, dead_code_threshold=THRESHOLD).train()


def _replica(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)  # different global RNG per rank: nothing may depend on it
        quantizer = _quantizer()
        restarts = [quantizer(_data(step, rank)).restarted_codes for step in range(STEPS)]
        result = {"state": quantizer.state_dict(), "restarts": torch.stack(restarts)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("replicas")
    mp.spawn(_replica, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow  # two fresh processes import torch and diffusers
def test_replicas_hold_identical_codebooks_after_restarts(replicas):
    (a, b) = replicas
    assert int(a["restarts"][SHIFT_AT:].sum()) > 0, "the shifted data must force dead-code restarts"
    assert torch.equal(a["restarts"], b["restarts"])
    for key in ("embedding", "cluster_size", "embed_sum", "initialized"):
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert bool(a["state"]["initialized"])
    for key in ("embedding", "cluster_size", "embed_sum"):
        assert a["state"][key].isfinite().all(), f"{key}: a non-finite latent on one rank reached the codebook"


@pytest.mark.slow
def test_two_processes_equal_one_process_with_their_global_batch(replicas):
    """The threshold and the restart candidates do not depend on how the global batch is split."""
    quantizer = _quantizer()
    restarts = [quantizer(torch.cat([_data(step, 0), _data(step, 1)])).restarted_codes for step in range(STEPS)]
    assert torch.equal(torch.stack(restarts), replicas[0]["restarts"])
    for key in ("embedding", "cluster_size", "embed_sum"):
        assert torch.allclose(quantizer.state_dict()[key], replicas[0]["state"][key], rtol=1e-4, atol=1e-4), key


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
