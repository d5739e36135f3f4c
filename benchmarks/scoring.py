"""Scoring vs reconstructing one volume: seconds of the report (`ctpa-vq reconstruct`'s PSNR, 3D SSIM and
region errors) over seconds of the pipeline, measured in one run.

Printed (JSON), all from this run on the same volume:
  * ``scoring_over_reconstruction``: (region labels + `reconstruction_metrics`) / the pipeline's seconds
    (goal: at most 0.25);
  * ``ssim_ours_over_torchmetrics``: our separable SSIM's seconds per voxel over torchmetrics' full-kernel
    3D SSIM (what `metrics.py` ran before), the latter timed on ``--reference-tiles`` tiles of
    32x128x128 voxels with their 5-voxel halo (the old tiling) and scaled to the volume.

The model is a randomly initialised preset: it costs what a trained one costs.

    python benchmarks/scoring.py                                  # CPU, tiny, 133x512x512 phantom
    python benchmarks/scoring.py --device cuda --preset ctpa-512 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.evaluation.metrics import SSIM_KERNEL, SSIM_SIGMA, reconstruction_metrics, ssim_hu
from ctpa_vq.evaluation.regions import region_labels


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scoring_split(
    pipeline: CTPAReconstructionPipeline, hu: np.ndarray, batch_size: int = 1, max_patch_voxels: int | None = None
) -> dict:
    """Seconds of the pipeline on ``hu`` `(D, H, W)` (planned grid) and of scoring its output as
    `ctpa-vq reconstruct` does (region labels on the CPU, the metrics on the model's device)."""
    device = pipeline.vqgan.device
    synchronize(device)
    start = time.perf_counter()
    reconstruction = pipeline(hu, batch_size=batch_size, max_patch_voxels=max_patch_voxels).reconstruction
    synchronize(device)
    model_seconds = time.perf_counter() - start
    start = time.perf_counter()
    labels = region_labels(hu)
    labels_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = reconstruction_metrics(reconstruction, hu, pipeline.window, device=device, labels=labels)
    metrics_seconds = time.perf_counter() - start
    scoring = labels_seconds + metrics_seconds
    return {
        "reconstruction_s": round(model_seconds, 3), "region_labels_s": round(labels_seconds, 3),
        "metrics_s": round(metrics_seconds, 3), "scoring_s": round(scoring, 3),
        "scoring_over_reconstruction": round(scoring / model_seconds, 3),
        "psnr_db": round(metrics.psnr, 3), "ssim": round(metrics.ssim, 5),
    }


def torchmetrics_ssim_seconds_per_voxel(reconstruction, hu, window, device, tiles: int) -> float:
    """torchmetrics' 3D SSIM on ``tiles`` 32x128x128 cores with a 5-voxel halo: seconds per core voxel."""
    halo = SSIM_KERNEL // 2
    core = [min(c, size - 2 * halo) for c, size in zip((32, 128, 128), hu.shape)]
    seconds = 0.0
    for tile in range(tiles):  # along D, then the same tiles again
        d0 = tile * core[0] % (hu.shape[0] - core[0] - 2 * halo + 1)
        region = (slice(d0, d0 + core[0] + 2 * halo), *(slice(0, c + 2 * halo) for c in core[1:]))
        pair = [torch.as_tensor(v[region], dtype=torch.float32, device=device)[None, None] for v in (reconstruction, hu)]
        synchronize(torch.device(device))
        start = time.perf_counter()
        structural_similarity_index_measure(*pair, sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL, data_range=window,
                                            return_full_image=True)
        synchronize(torch.device(device))
        seconds += time.perf_counter() - start
    return seconds / (tiles * core[0] * core[1] * core[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shape", type=int, nargs=3, default=(133, 512, 512), metavar=("D", "H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-tiles", type=int, default=2, help="torchmetrics tiles to time (0: skip)")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipeline = CTPAReconstructionPipeline(VQGAN3D.from_preset(args.preset).to(args.device))
    pipeline.set_progress_bar_config(disable=True)
    hu = make_phantom(tuple(args.shape), seed=7)
    result = {"preset": args.preset, "shape": list(args.shape), "device": args.device,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size}
    result |= scoring_split(pipeline, hu, args.batch_size)
    if args.reference_tiles:
        reconstruction = pipeline(hu, batch_size=args.batch_size).reconstruction
        ours_start = time.perf_counter()
        ssim_hu(reconstruction, hu, pipeline.window, device=args.device)
        ours = (time.perf_counter() - ours_start) / hu.size
        reference = torchmetrics_ssim_seconds_per_voxel(reconstruction, hu, pipeline.window, args.device,
                                                        args.reference_tiles)
        result |= {"ssim_ours_s": round(ours * hu.size, 3), "ssim_torchmetrics_s_estimated": round(reference * hu.size, 1),
                   "ssim_ours_over_torchmetrics": round(ours / reference, 4)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
