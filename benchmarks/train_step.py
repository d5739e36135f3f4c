"""Training-loop overhead: steps/s of `ctpa_vq.training.train` vs bare forward+backward+step.

Both run the same model, batch size and patch size in this process, one after the other.
The loop's time per step comes from its own `patches_per_s` column in metrics.csv (steps
between log points, after the first window, so start-up and the first allocations are out);
the bare loop is `model(x)`, the same L1 + commitment loss, `backward`, AdamW `step` on one
fixed batch already in memory (no data loading): the compute floor of a training step.

    python benchmarks/train_step.py                                  # CPU, tiny, 32x64x64
    python benchmarks/train_step.py --preset ctpa-512 --patch 128 256 256 --batch-size 1 \
        --mixed-precision bf16 --steps 30                            # on a GPU
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from ctpa_vq import VQGAN3D
from ctpa_vq.training import load_config, train


def bare_step_time(preset: str, patch: list[int], batch: int, steps: int, device: str, bf16: bool) -> tuple[float, float]:
    """Seconds per bare step and peak GPU memory (MiB, 0 on CPU)."""
    torch.manual_seed(0)
    model = VQGAN3D.from_preset(preset).to(device).train()
    if preset != "tiny":
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    x = torch.rand(batch, 1, *patch, device=device) * 2 - 1

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = 4.0 * (out.sample.float() - x).abs().mean() + out.commitment_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return (time.perf_counter() - start) / steps, peak


def loop_step_time(preset: str, patch: list[int], batch: int, steps: int, out: Path) -> float:
    """Seconds per step of the real loop (data, forward, backward, optimizer, logging)."""
    log_every = max(1, steps // 4)
    config = load_config(
        None,
        [
            f"model.preset={preset}", f"model.gradient_checkpointing={preset != 'tiny'}",
            f"dataset.patch_size=[{','.join(map(str, patch))}]",
            f"dataset.phantom_shape=[{','.join(str(p * 3 // 2) for p in patch)}]",
            "dataset.phantoms=6", f"training.batch_size={batch}", f"training.max_steps={steps}",
            f"training.log_every={log_every}", f"training.validate_every={10 * steps}",
            f"training.checkpoint_every={10 * steps}", f"training.output_dir={out}",
        ],
    )  # fmt: skip
    train(config)
    with (out / "metrics.csv").open() as f:
        rates = [float(r["patches_per_s"]) for r in csv.DictReader(f) if r["patches_per_s"]]
    steady = rates[1:] or rates  # the first window includes warm-up
    return batch / (sum(steady) / len(steady))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--patch", nargs=3, type=int, default=[32, 64, 64], metavar=("D", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.mixed_precision == "bf16"
    if bf16:  # the loop takes its precision from Accelerate
        import os

        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    # Bare steps before and after the loop, averaged: the machine's drift hits both sides alike.
    bare_before, _ = bare_step_time(args.preset, args.patch, args.batch_size, args.steps, device, bf16)
    with tempfile.TemporaryDirectory() as tmp:
        loop = loop_step_time(args.preset, args.patch, args.batch_size, args.steps, Path(tmp) / "run")
    bare_after, peak = bare_step_time(args.preset, args.patch, args.batch_size, args.steps, device, bf16)
    bare = (bare_before + bare_after) / 2
    print(f"device={device} preset={args.preset} patch={'x'.join(map(str, args.patch))} batch={args.batch_size} "
          f"precision={args.mixed_precision} threads={torch.get_num_threads()}")  # fmt: skip
    print(f"loop:  {1 / loop:.3f} steps/s ({loop * 1000:.0f} ms/step)")
    print(f"bare:  {1 / bare:.3f} steps/s ({bare * 1000:.0f} ms/step)")
    print(f"loop / bare time per step: {loop / bare:.3f}  (overhead {100 * (loop / bare - 1):+.1f}%, goal < +10%)")
    if device == "cuda":
        print(f"peak GPU memory (bare step): {peak:.0f} MiB = {peak / args.batch_size:.0f} MiB per patch")


if __name__ == "__main__":
    main()
