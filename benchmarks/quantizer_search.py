"""Nearest-code search: the chunked search of the EMA quantizer vs the full distance matrix.

    python benchmarks/quantizer_search.py [--latents 16 32 32] [--codes 16384]

Each variant runs in a fresh process on the same latents (ctpa-512's codebook; a quarter of
one 128x256x256 patch's latent grid by default, so the full matrix fits a 24 GiB machine) and
reports its peak RSS above the inputs and its time (best of 3). Prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _inputs(latents: list[int], codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = latents[0] * latents[1] * latents[2]
    return torch.randn(n, 8, generator=g), torch.randn(codes, 8, generator=g)


def _full_matrix(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The textbook search: one `(N, K)` matrix (what the quantizer did before)."""
    distances = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    return distances.min(dim=1).indices


def _chunked(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    from ctpa_vq.models.quantizer import nearest_codes

    return nearest_codes(flat, codebook)[1]


def _run_variant(name: str, latents: list[int], codes: int) -> None:
    flat, codebook = _inputs(latents, codes)
    search = {"full": _full_matrix, "chunked": _chunked}[name]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        start = time.perf_counter()
        indices = search(flat, codebook)
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    checksum = int(indices.sum())
    print(json.dumps({"peak_mb": peak_mb, "seconds": min(times), "checksum": checksum}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs=3, default=[16, 32, 32])
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _run_variant(args.variant, args.latents, args.codes)
        return
    results = {}
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--latents", *map(str, args.latents)]
        out = subprocess.run([*cmd, "--codes", str(args.codes)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    n = args.latents[0] * args.latents[1] * args.latents[2]
    print(f"{n} latents x {args.codes} codes: full matrix {n * args.codes * 4 / 2**30:.2f} GiB of fp32")
    for name, r in results.items():
        print(f"  {name:8s} peak RSS above inputs {r['peak_mb']:8.0f} MB   {r['seconds']:.3f} s")
    print(f"  same indices: {full['checksum'] == chunked['checksum']}")
    memory, speed = chunked["peak_mb"] / full["peak_mb"], chunked["seconds"] / full["seconds"]
    print(f"  chunked / full: memory {memory:.3f}, time {speed:.2f}")


if __name__ == "__main__":
    main()
