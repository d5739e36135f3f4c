"""Patch-wise whole-volume inference: our PatchStitcher vs MONAI sliding_window_inference.

One run measures, on the same model, volume, grid and gaussian weights (MONAI is given our
weight map, so both blend identically):
  * max |ours - MONAI| of the stitched outputs;
  * time ours / MONAI, and ours / the compute floor (the same number of patches through the
    model with no slicing, blending or accumulation);
  * peak memory ours / MONAI: of the stitching alone (peak above the floor's peak) and in all.
Times are the best of rounds that run the methods in turn in one process (fair under varying
load). Peak memory is measured in a fresh subprocess per method, after a warm-up run, above the
set-up (CPU: resident-set high-water mark, reset through /proc/self/clear_refs; GPU:
torch.cuda.max_memory_allocated).

    python benchmarks/stitching.py                      # CPU: 48x96x96 volume, 24x48x48 patch, VQGAN3D tiny
    python benchmarks/stitching.py --model conv         # cheap conv stand-in: stitching overhead exposed
    python benchmarks/stitching.py --model copy --volume 604 512 512 --patch 128 256 256   # full size, CPU
    python benchmarks/stitching.py --full               # GPU: 604x512x512, 128x256x256 patch, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("floor", "ours", "monai")


def _model(args, device: torch.device):
    """The patch function: (B, 1, *patch) -> (B, 1, *patch)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.model == "copy":  # no compute: a fresh output per patch, what stitching costs is all there is
        return lambda x: x * 1.0
    if args.model == "conv":
        net = torch.nn.Conv3d(1, 1, 3, padding=1).to(device, dtype).eval()
        return lambda x: net(x)
    from ctpa_vq import VQGAN3D

    net = VQGAN3D.from_preset(args.model).to(device).eval()
    for part in (net.encoder, net.quant_conv, net.post_quant_conv, net.decoder):  # the quantizer stays float32
        part.to(dtype)
    return lambda x: net(x).sample


def _rss_peak_reset() -> int:
    """Reset this process's resident-set high-water mark; returns the current resident set (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS:")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Setup:
    """The model, volume, grid and weights every method shares."""

    def __init__(self, args) -> None:
        from ctpa_vq.patching import PatchGrid, blend_weights

        torch.set_num_threads(args.threads)
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float32
        self.model = _model(args, self.device)
        self.volume = torch.rand(1, *args.volume, generator=torch.Generator().manual_seed(0)) * 2 - 1  # on the CPU
        self.grid = PatchGrid(args.volume, args.patch, args.overlap)
        self.weights = blend_weights(self.grid.patch_size, "gaussian").to(self.device)
        self.one_batch = torch.rand(args.batch_size, 1, *args.patch, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def run(self, method: str) -> torch.Tensor:
        """One whole volume; output on the CPU (for "floor": the last batch, no stitching at all)."""
        from monai.inferers import sliding_window_inference

        from ctpa_vq.patching import PatchStitcher

        args, model = self.args, self.model
        if method == "floor":
            for _ in range(-(-len(self.grid) // args.batch_size)):
                out = model(self.one_batch)
        elif method == "ours":
            out = PatchStitcher(self.grid, "gaussian")(
                model, self.volume, batch_size=args.batch_size, device=self.device, dtype=self.dtype, out_device="cpu"
            )
        else:
            out = sliding_window_inference(
                self.volume[None], args.patch, args.batch_size, lambda x: model(x.to(self.dtype)).float(),
                overlap=args.overlap, mode="gaussian", roi_weight_map=self.weights, sw_device=self.device, device="cpu",
            )[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out


def _memory_child(args) -> dict:
    """Peak memory of one method above the set-up, in this (fresh) process."""
    setup = _Setup(args)
    setup.run(args.method)  # warm-up: kernels, allocator, code pages
    report = {"method": args.method}
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gpu_baseline = torch.cuda.memory_allocated()
    baseline = _rss_peak_reset()
    setup.run(args.method)
    report["cpu_peak"] = _status_bytes("VmHWM:") - baseline
    if setup.device.type == "cuda":
        report["gpu_peak"] = torch.cuda.max_memory_allocated() - gpu_baseline
    return report


def _memory(method: str, args) -> dict:
    command = [sys.executable, __file__, "--child", method] + args.forwarded
    # A fixed mmap threshold makes glibc map every large tensor on its own and unmap it when freed,
    # so the resident set follows live memory instead of keeping freed heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _times(args) -> tuple[dict, float, int]:
    """Best time of each method over rounds that take the methods in turn (fair under varying load),
    the max |ours - MONAI| and the number of patches."""
    setup = _Setup(args)
    outputs = {method: setup.run(method) for method in METHODS}  # warm-up
    times = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            start = time.perf_counter()
            setup.run(method)
            times[method].append(time.perf_counter() - start)
    difference = float((outputs["ours"] - outputs["monai"]).abs().max())
    return {method: min(t) for method, t in times.items()}, difference, len(setup.grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="604x512x512 volume, 128x256x256 patch, cuda, bf16")
    parser.add_argument("--volume", type=int, nargs=3, default=[48, 96, 96], metavar=("D", "H", "W"))
    parser.add_argument("--patch", type=int, nargs=3, default=[24, 48, 48], metavar=("D", "H", "W"))
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--model", default="tiny", help="a VQGAN3D preset (tiny, ctpa-512), 'conv' or 'copy'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    parser.add_argument("--child", choices=METHODS, dest="method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.full:
        args.volume, args.patch, args.device, args.bf16 = [604, 512, 512], [128, 256, 256], "cuda", True
    if args.method:
        print(json.dumps(_memory_child(args)))
        return
    args.forwarded = [
        "--volume", *map(str, args.volume), "--patch", *map(str, args.patch), "--overlap", str(args.overlap),
        "--batch-size", str(args.batch_size), "--model", args.model, "--device", args.device,
        "--threads", str(args.threads), "--repeats", str(args.repeats),
    ] + (["--bf16"] if args.bf16 else [])

    memory = {method: _memory(method, args) for method in METHODS}
    seconds, difference, patches = _times(args)

    mib = 2**20
    print(f"volume {args.volume}, patch {args.patch}, overlap {args.overlap}, {patches} patches, "
          f"batch {args.batch_size}, model {args.model}, {args.device}{' bf16' if args.bf16 else ''}, "
          f"{args.threads} threads, best of {args.repeats}")
    for method in METHODS:
        line = f"  {method:6s} {seconds[method]:9.3f} s   peak CPU +{memory[method]['cpu_peak'] / mib:8.1f} MiB"
        if "gpu_peak" in memory[method]:
            line += f"   peak GPU +{memory[method]['gpu_peak'] / mib:8.1f} MiB"
        print(line)
    print(f"max |ours - MONAI|                {difference:.2e}")
    print(f"time ours / MONAI                 {seconds['ours'] / seconds['monai']:.3f}")
    print(f"time ours / floor                 {seconds['ours'] / seconds['floor']:.3f}")
    print(f"time MONAI / floor                {seconds['monai'] / seconds['floor']:.3f}")
    for kind in ("cpu_peak", "gpu_peak") if "gpu_peak" in memory["ours"] else ("cpu_peak",):
        ours, monai, floor = (memory[m][kind] for m in ("ours", "monai", "floor"))
        name = kind.split("_")[0].upper()
        print(f"peak {name} ours / MONAI          {ours / max(monai, 1):.3f}  (stitching alone, above the floor: "
              f"{max(ours - floor, 0) / mib:.1f} / {max(monai - floor, 0) / mib:.1f} MiB)")

if __name__ == "__main__":
    main()
