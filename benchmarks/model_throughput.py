"""VQGAN3D throughput: forward and forward+backward voxels/s, parameters, peak memory.

Ratios printed, all measured in this run:
  * achieved FLOP/s of the model / FLOP/s of a large matmul on the same device (the raw limit);
  * forward+backward time / forward time (about 3 for a conv net).

    python benchmarks/model_throughput.py                       # CPU, 64^3 patch, tiny + ctpa-512
    python benchmarks/model_throughput.py --device cuda --bf16 --patch 128 256 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Best of `repeats` timed calls after one warm-up (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _timed(lambda: a @ b, device, 10)


def measure(preset: str, patch: list[int], device_name: str, bf16: bool, checkpointing: bool, repeats: int) -> dict:
    """One configuration, in this process (run in a fresh subprocess so peak memory is its own)."""
    from ctpa_vq import VQGAN3D

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = VQGAN3D.from_preset(preset).to(device)
    if checkpointing:
        model.enable_gradient_checkpointing()
    x = torch.rand(1, 1, *patch, device=device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def forward():
        with torch.no_grad(), autocast:
            model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
            loss = (out.sample.float() - x).abs().mean() + out.commitment_loss
        loss.backward()

    model.train()
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    train_flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fwd = _timed(forward, device, repeats)
    t_train = _timed(forward_backward, device, repeats)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux: the process high-water mark above the post-build baseline
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    voxels = x.numel()
    limit = matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    return {
        "preset": preset,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "patch": "x".join(map(str, patch)),
        "forward_Mvox_s": voxels / t_fwd / 1e6,
        "train_Mvox_s": voxels / t_train / 1e6,
        "train_over_forward": t_train / t_fwd,
        "train_TFLOP_s": train_flops / t_train / 1e12,
        "of_matmul_peak": train_flops / t_train / limit,
        "peak_MB": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ctpa-512"])
    parser.add_argument("--patch", nargs=3, type=int, default=[64, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure(args.presets[0], args.patch, args.device, args.bf16, args.checkpointing, args.repeats)))
        return
    print(f"device={args.device} bf16={args.bf16} checkpointing={args.checkpointing} threads={torch.get_num_threads()}")
    header = f"{'preset':>9} {'params':>8} {'patch':>11} {'fwd Mvox/s':>10} {'train Mvox/s':>12} {'train/fwd':>9} {'TFLOP/s':>8} {'of matmul peak':>14} {'peak MB':>8}"
    print(header)
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--one", "--presets", preset, "--patch", *map(str, args.patch),
               "--device", args.device, "--repeats", str(args.repeats)]  # fmt: skip
        cmd += ["--bf16"] * args.bf16 + ["--checkpointing"] * args.checkpointing
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(
            f"{r['preset']:>9} {r['params_M']:>7.2f}M {r['patch']:>11} {r['forward_Mvox_s']:>10.3f} "
            f"{r['train_Mvox_s']:>12.3f} {r['train_over_forward']:>9.2f} {r['train_TFLOP_s']:>8.3f} "
            f"{r['of_matmul_peak']:>13.1%} {r['peak_MB']:>8.0f}"
        )


if __name__ == "__main__":
    main()
