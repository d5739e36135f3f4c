"""`ctpa-vq encode` throughput: volumes/s per process, and what the table costs on top of the model.

Ratios printed, all measured in this run:
  * encode_dataset seconds per volume / `encode_volume` seconds per volume on the same volumes
    (the cost of reading the prepared volume, quantising, scaling and writing the Parquet row);
  * peak resident memory growth during encode_dataset / one volume as float32 (memory is meant to
    be bounded by about one volume plus the model's activations for one patch).

    python benchmarks/encode.py                                   # CPU, tiny model, 4 x (64, 128, 128)
    python benchmarks/encode.py --device cuda --preset ctpa-512 --shape 600 512 512 --volumes 4
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline
from ctpa_vq.data.patch_dataset import VolumeStore
from ctpa_vq.data.phantom import write_phantom_dir
from ctpa_vq.data.prepare import prepare_dataset
from ctpa_vq.latents.encode import encode_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"))
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    try:
        write_phantom_dir(work / "nifti", args.volumes, args.shape, compressed=False)
        prepare_dataset(work / "nifti", work / "prepared", val_fraction=0.0, progress=False)
        torch.manual_seed(0)
        channels = VQGAN3D.from_preset(args.preset).config.vq_embed_dim
        model = VQGAN3D.from_preset(args.preset, latents_mean=[0.0] * channels, latents_std=[1.0] * channels)
        CTPAReconstructionPipeline(model).save_pretrained(work / "model")
        options = dict(patch_size=tuple(args.patch), overlap=0.25)

        pipe = CTPAReconstructionPipeline(model.to(args.device))
        pipe.set_progress_bar_config(disable=True)
        store = VolumeStore.from_disk(work / "prepared")
        pipe.encode_volume(store.volume(0), **options)  # warm-up
        start = time.perf_counter()
        for index in range(len(store)):
            pipe.encode_volume(store.volume(index), **options)
        model_seconds = (time.perf_counter() - start) / len(store)

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = encode_dataset(work / "model", work / "prepared", work / "latents", progress=False, **options)
        peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        table_seconds = report.seconds / report.encoded
        volume_bytes = 4 * args.shape[0] * args.shape[1] * args.shape[2]
        result = {
            "preset": args.preset, "shape": list(args.shape), "patch": list(args.patch), "device": args.device,
            "threads": torch.get_num_threads(), "volumes": report.encoded,
            "volumes_per_s_per_process": round(report.volumes_per_second, 4),
            "seconds_per_volume": round(table_seconds, 3),
            "encode_volume_seconds_per_volume": round(model_seconds, 3),
            "ratio_encode_dataset_to_encode_volume": round(table_seconds / model_seconds, 3),
            "ratio_peak_rss_growth_to_one_volume_f32": round(peak_growth / volume_bytes, 2),
            "table_mb": round(sum(p.stat().st_size for p in (work / "latents" / "data").glob("*")) / 2**20, 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
