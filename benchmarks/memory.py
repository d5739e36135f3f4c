"""Predicted peak GPU memory per process of one training step, traced on fake tensors (no GPU).

For a recipe (default ``configs/ctpa_512.yaml``: ctpa-512, batch 1, 128x256x256) prints the
table over {generator only, GAN stage on} x {fp32, bf16 autocast} x {gradient checkpointing
off, on}: tensors alive at the peak (what ``torch.cuda.max_memory_allocated`` reports on one
GPU), the per-process figure with DDP buckets (``--processes``), 10 % allocator
fragmentation and 1 GiB CUDA context, whether that fits an 80 GB H100 / 141 GB H200, and the
trace time. ``--cpu-autocast-rules`` traces bf16 with the CPU's autocast rules instead of
CUDA's (GroupNorm in bf16 rather than fp32), which is how issue 10's reference figures were
made: it shows how much the CUDA rules matter.

    python benchmarks/memory.py                                  # ~2 min on 2 CPU cores
    python benchmarks/memory.py --batch-size 2                   # what an H200's headroom buys
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from unittest import mock

import torch

from ctpa_vq.training import memory
from ctpa_vq.training.config import load_config
from ctpa_vq.training.memory import CUDA_CONTEXT_BYTES, FRAGMENTATION, GIB, predict_step_memory, with_knob

# What torch.cuda.get_device_properties(i).total_memory leaves, rounded down.
CARDS = {"H100 80GB": 78.0, "H200 141GB": 139.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ctpa_512.yaml")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 256, 256), metavar=("D", "H", "W"))
    parser.add_argument("--processes", type=int, default=4, help="DDP processes (adds gradient buckets)")
    parser.add_argument("--cpu-autocast-rules", action="store_true", help="bf16 as CPU autocast casts it")
    args = parser.parse_args()

    base = load_config(args.config)
    base = with_knob(base, training__batch_size=args.batch_size, dataset__patch_size=tuple(args.patch))
    rules = mock.patch.object(memory, "_CUDA_FLOAT32_OPS", frozenset()) if args.cpu_autocast_rules else contextlib.nullcontext()
    print(f"{base.model.preset}, batch {args.batch_size} x {tuple(args.patch)} per process, {args.processes} DDP "
          f"processes, AdamW; torch {torch.__version__}, {platform.processor() or platform.machine()}; bf16 with "
          f"{'CPU' if args.cpu_autocast_rules else 'CUDA'} autocast rules")
    print(f"per process = (tensors + DDP buckets) x {1 + FRAGMENTATION:.2f} + {CUDA_CONTEXT_BYTES / GIB:.0f} GiB CUDA context")
    header = ["stage", "precision", "checkpointing", "tensors GiB", "per process GiB", *CARDS, "trace s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with rules:
        for stage, gan_stage in (("generator only", False), ("GAN stage on", True)):
            for precision in ("no", "bf16"):
                for checkpointing in (False, True):
                    config = with_knob(base, model__gradient_checkpointing=checkpointing)
                    predicted = predict_step_memory(config, precision, gan_stage, args.processes)
                    per_process = predicted.per_process / GIB
                    fits = ["fits" if per_process <= size else "no" for size in CARDS.values()]
                    row = [stage, "fp32" if precision == "no" else "bf16", "on" if checkpointing else "off",
                           f"{predicted.traced_peak / GIB:.1f}", f"{per_process:.1f}", *fits,
                           f"{predicted.trace_seconds:.0f}"]
                    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
