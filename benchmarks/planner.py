"""Whole-volume reconstruction: the planned patch grid vs the fixed grid vs MONAI, against the model floor.

Sections (all by default; each prints its own table):

  work    voxels run through the model per volume voxel, for 604x512x512, 133x512x512 and
          61x512x512: planned grid (16-voxel overlap, 128*256*256-voxel budget), the fixed
          (128, 256, 256) grid at 25% overlap, and MONAI's sliding window with that patch
          (counted with MONAI's own `dense_patch_slices`). Analytic: no model runs.
  time    one real volume (a phantom, default 61x512x512) through a trained `tiny` model, each
          method in a fresh process: wall, user and system CPU seconds, page faults, PSNR in HU
          over the window; ratios to the model floor (the model alone on the volume's voxels,
          measured on one planned patch and scaled by voxels).
            planned  the pipeline's defaults (planned grid, per-patch route, linear blend) with
                     freed memory kept (`keep_freed_memory`, as `ctpa-vq` does)
            today    the previous defaults: fixed grid, latent-grid route, gaussian blend, glibc defaults
            monai    monai.inferers.sliding_window_inference, the fixed patch, gaussian, glibc defaults
  real    the two real chest CTs of benchmarks/real_ct.py (lung1 48x512x512, lung2 61x512x512)
          through the trained `tiny` model with several grids and routes (`REAL_VARIANTS`):
          work multiplier, CPU seconds, PSNR/SSIM over the volume and the body, MAE in the body.
  routes  PSNR of the reconstruction routes on a 133x160x160 phantom: per-patch vs latent grid
          (nearest codes or blended latents), with the planned grid and with 27 patches of 64^3.
  seams   the smallest seam-free overlap: a trained model's patch-wise output minus its
          whole-volume output, steepest steps at the patch transitions / elsewhere, per overlap.

    python benchmarks/planner.py                         # all sections, 61x512x512 timed
    python benchmarks/planner.py --sections time --volume 133 512 512 --methods planned
    python benchmarks/planner.py --sections work routes
    python benchmarks/planner.py --sections real --real lung1 --variants "planned (default)" "old default"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trained_tiny import PATCH as TRAINING_PATCH, trained_tiny  # noqa: E402

from ctpa_vq.data.phantom import make_phantom  # noqa: E402
from ctpa_vq.models.intensity import hu_to_unit  # noqa: E402
from ctpa_vq.patching import PatchGrid, PatchStitcher, plan_grid  # noqa: E402
from ctpa_vq.pipelines import CTPAReconstructionPipeline  # noqa: E402
from ctpa_vq.pipelines.reconstruction import DEFAULT_MAX_PATCH_VOXELS  # noqa: E402

FIXED_PATCH = (128, 256, 256)
FACTOR = (4, 4, 4)
CTPA_SHAPES = ((604, 512, 512), (133, 512, 512), (61, 512, 512))
METHODS = ("floor", "planned", "today", "monai")


def _pipeline() -> CTPAReconstructionPipeline:
    pipeline = CTPAReconstructionPipeline(trained_tiny())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _psnr(reconstruction_hu: np.ndarray, hu: np.ndarray, window) -> float:
    low, high = window
    error = np.clip(reconstruction_hu, low, high).astype(np.float64) - np.clip(hu, low, high)
    return 10 * math.log10((high - low) ** 2 / float(np.mean(error**2)))


# ----------------------------------------------------------------------------- work


def monai_windows(shape, patch=FIXED_PATCH, overlap=0.25) -> int:
    """Windows MONAI's sliding_window_inference runs (it pads the volume up to the patch first)."""
    from monai.inferers.utils import _get_scan_interval
    from monai.data.utils import dense_patch_slices

    padded = [max(s, p) for s, p in zip(shape, patch)]
    interval = _get_scan_interval(padded, patch, 3, (overlap,) * 3)
    return len(dense_patch_slices(padded, patch, interval))


def work_table() -> None:
    pipeline = CTPAReconstructionPipeline(trained_tiny())
    print("work multiplier (voxels run / volume voxels); budget 128*256*256 voxels per patch, overlap 16 voxels")
    print(f"{'volume':>14s} {'planned':>8s} {'fixed grid':>10s} {'MONAI':>7s}   plan")
    for shape in CTPA_SHAPES:
        planned = pipeline.patch_grid(shape)
        fixed = pipeline.patch_grid(shape, FIXED_PATCH, 0.25)
        monai = monai_windows(shape) * math.prod(FIXED_PATCH) / math.prod(shape)
        print(f"{'x'.join(map(str, shape)):>14s} {planned.work_multiplier:8.2f} {fixed.work_multiplier:10.2f} "
              f"{monai:7.2f}   {planned.describe()}")


# ----------------------------------------------------------------------------- time


def _child(method: str, shape) -> dict:
    """One method on one phantom in this fresh process."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    pipeline = _pipeline()
    model = pipeline.vqgan
    hu = make_phantom(shape, seed=7)
    if method in ("floor", "planned"):
        from ctpa_vq.utils.allocator import keep_freed_memory

        keep_freed_memory()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    report = {"method": method}
    with torch.inference_mode():
        if method == "floor":
            patch = pipeline.patch_grid(shape).patch_size
            x = torch.rand(1, 1, *patch) * 2 - 1
            model(x)  # warm-up: allocator, kernels
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            model(x)
            report["scale"] = math.prod(shape) / math.prod(patch)
        elif method == "planned":
            out = pipeline(hu).reconstruction
        elif method == "today":
            out = pipeline(hu, patch_size=FIXED_PATCH, overlap=0.25, blend="gaussian", route="latent-grid",
                           latent_blend="gaussian").reconstruction
        else:
            from monai.inferers import sliding_window_inference

            unit = torch.as_tensor(hu_to_unit(hu, pipeline.window))[None, None]
            result = sliding_window_inference(unit, FIXED_PATCH, 1, lambda x: model(x).sample, overlap=0.25,
                                              mode="gaussian")
            low, high = pipeline.window
            out = ((result[0, 0].clamp(-1, 1) + 1) * ((high - low) / 2) + low).numpy()
    end = resource.getrusage(resource.RUSAGE_SELF)
    scale = report.get("scale", 1.0)
    report.update(
        wall=(time.perf_counter() - start) * scale,
        user=(end.ru_utime - usage.ru_utime) * scale,
        sys=(end.ru_stime - usage.ru_stime) * scale,
        faults=int((end.ru_minflt - usage.ru_minflt) * scale),
        peak_rss_mib=end.ru_maxrss / 1024,
    )
    if method != "floor":
        report["psnr"] = _psnr(out, hu, pipeline.window)
    return report


def time_table(shape, methods=METHODS) -> None:
    reports = {}
    for method in methods:
        command = [sys.executable, __file__, "--child", method, "--volume", *map(str, shape)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"{method} failed:\n{result.stderr[-3000:]}")
        reports[method] = json.loads(result.stdout.strip().splitlines()[-1])
    floor = reports["floor"]
    floor_cpu = floor["user"] + floor["sys"]
    print(f"\n{'x'.join(map(str, shape))} phantom, trained tiny model, {os.cpu_count()} CPUs "
          f"(floor: the model alone on the volume's voxels; CPU = user + system)")
    print(f"{'method':>8s} {'wall s':>8s} {'user s':>8s} {'sys s':>7s} {'faults':>10s} {'CPU/floor':>9s} "
          f"{'wall/floor':>10s} {'PSNR dB':>8s} {'peak RSS':>9s}")
    for method, r in reports.items():
        psnr = f"{r['psnr']:8.2f}" if "psnr" in r else f"{'':8s}"
        print(f"{method:>8s} {r['wall']:8.1f} {r['user']:8.1f} {r['sys']:7.1f} {r['faults']:10d} "
              f"{(r['user'] + r['sys']) / floor_cpu:9.2f} {r['wall'] / floor['wall']:10.2f} {psnr} "
              f"{r['peak_rss_mib']:7.0f}MB")


# ----------------------------------------------------------------------------- routes


@torch.inference_mode()
def routes_table() -> None:
    pipeline = _pipeline()
    hu = make_phantom((133, 160, 160), seed=100)
    print("\nroutes on a 133x160x160 phantom, trained tiny model: PSNR dB (HU over the window)")
    grids = {"planned (default)": {}, "27 patches of 64^3, 25%": dict(patch_size=(64, 64, 64), overlap=0.25)}
    variants = {
        "per-patch (default)": dict(route="per-patch"),
        "latent grid, nearest codes": dict(route="latent-grid", latent_blend="nearest"),
        "latent grid, blended latents": dict(route="latent-grid", latent_blend="gaussian"),
    }
    for grid_name, grid in grids.items():
        plan = pipeline.patch_grid(hu.shape, **grid).describe()
        for blend in ("linear", "gaussian"):
            scores = {
                name: _psnr(pipeline(hu, blend=blend, **grid, **variant).reconstruction, hu, pipeline.window)
                for name, variant in variants.items()
            }
            print(f"  {grid_name}, {blend} pixel blend ({plan}): "
                  + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()))


# ----------------------------------------------------------------------------- real

REAL_VARIANTS = {
    "planned (default)": {},
    "planned, cut front-back": "front-back",
    "planned, training patch's voxels": dict(max_patch_voxels=math.prod(TRAINING_PATCH)),
    "planned, overlap 64": dict(overlap=64),
    "fixed 128x256x256 25%, per-patch": dict(patch_size=FIXED_PATCH, overlap=0.25),
    "old default": dict(patch_size=FIXED_PATCH, overlap=0.25, blend="gaussian", route="latent-grid",
                        latent_blend="gaussian"),
    "one patch": dict(max_patch_voxels=10**10),
}
"""The grids and routes scored on the real CTs. "old default": the pipeline's default before the
planner (fixed (128, 256, 256) patches at 25%, gaussian, the latent-grid route with blended
latents); "cut front-back": the plan before it kept H whole among equally cheap grids;
"training patch's voxels": the budget of the patch the model was trained on."""


def _real_options(variant: str, shape) -> dict:
    options = REAL_VARIANTS[variant]
    if options == "front-back":  # the cheapest plan, ties broken by patch size alone (H cut before W)
        grid = plan_grid(shape, DEFAULT_MAX_PATCH_VOXELS, 16, FACTOR)
        return dict(patch_size=grid.patch_size, overlap=16)
    return options


def real_table(names, variants) -> None:
    from real_ct import load_real_ct

    from ctpa_vq.evaluation.metrics import reconstruction_metrics

    pipeline = _pipeline()
    print(f"\nreal chest CTs (benchmarks/real_ct.py), trained tiny model (training patch {TRAINING_PATCH}); "
          f"HU over {pipeline.window}; "
          f"{torch.get_num_threads()} threads; CPU s = user + system of this process")
    print(f"{'volume':>6s} {'variant':>42s} {'work':>5s} {'CPU s':>6s} {'PSNR':>6s} {'SSIM':>6s} "
          f"{'bodyPSNR':>8s} {'bodySSIM':>8s} {'MAE body':>8s}   plan")
    for name in names:
        hu = load_real_ct(name).hu
        for variant in variants:
            options = _real_options(variant, hu.shape)
            grid_options = {k: v for k, v in options.items() if k in ("patch_size", "overlap", "max_patch_voxels")}
            grid = pipeline.patch_grid(hu.shape, **grid_options)
            start = time.process_time()
            with torch.inference_mode():
                out = pipeline(hu, **options).reconstruction
            cpu = time.process_time() - start
            m = reconstruction_metrics(out, hu, pipeline.window)
            print(f"{name:>6s} {variant:>42s} {grid.work_multiplier:5.2f} {cpu:6.0f} {m.psnr:6.2f} {m.ssim:6.3f} "
                  f"{m.body_psnr:8.2f} {m.body_ssim:8.3f} {m.mae['body']:8.1f}   {grid.describe()}", flush=True)


# ----------------------------------------------------------------------------- seams


def _seam_step_ratio(difference: torch.Tensor, grid: PatchGrid) -> list[float]:
    """Per axis: mean |step| of `difference` (1, D, H, W) within 2 voxels of the planes where the
    nearest patch changes, over the mean |step| elsewhere (1: no seam)."""
    ratios = []
    for axis, (origins, patch) in enumerate(zip(grid.axis_origins, grid.patch_size)):
        position = torch.arange(difference.shape[axis + 1], dtype=torch.float64)
        owner = (position[:, None] - (torch.tensor(origins) + (patch - 1) / 2)[None]).abs().argmin(1)
        seam = owner[1:] != owner[:-1]
        band = seam.clone()
        for shift in (-2, -1, 1, 2):
            band |= torch.roll(seam, shift)
        other_axes = [a + 1 for a in range(3) if a != axis]
        step = difference.diff(dim=axis + 1).abs().mean(dim=other_axes)[0]
        ratios.append(float(step[band].mean() / step[~band].mean()))
    return ratios


@torch.inference_mode()
def seams_table() -> None:
    model = trained_tiny()
    shape = (64, 128, 128)
    unit = torch.as_tensor(hu_to_unit(make_phantom(shape, seed=100), tuple(model.config.hu_window)))[None]
    forward = lambda x: model(x).sample  # noqa: E731
    whole = forward(unit[None])[0]
    print(f"\nseams: {'x'.join(map(str, shape))} phantom, 2x2x2 patches; steepest-step ratio at patch transitions"
          " (patch-wise minus whole-volume output; 1 = no seam), D/H/W")
    for overlap in (0, 8, 16, 24, 32):
        grid = PatchGrid(shape, [(n + overlap) // 2 for n in shape], overlap, FACTOR)
        cells = []
        for blend in ("linear", "gaussian"):
            out = PatchStitcher(grid, blend)(forward, unit)
            psnr = 10 * math.log10(4 / float(((out.clamp(-1, 1) - unit) ** 2).mean()))
            ratios = "/".join(f"{r:.2f}" for r in _seam_step_ratio(out - whole, grid))
            cells.append(f"{blend} {ratios} ({psnr:.2f} dB)")
        print(f"  overlap {overlap:2d} voxels, {grid.work_multiplier:.2f}x: " + "; ".join(cells))
    print(f"  whole volume: {10 * math.log10(4 / float(((whole.clamp(-1, 1) - unit) ** 2).mean())):.2f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["work", "time", "real", "routes", "seams"],
                        choices=["work", "time", "real", "routes", "seams"])
    parser.add_argument("--volume", type=int, nargs=3, default=[61, 512, 512], metavar=("D", "H", "W"))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods of the time section (the floor is always run)")
    parser.add_argument("--real", nargs="+", default=["lung1", "lung2"], help="real volumes of the real section")
    parser.add_argument("--variants", nargs="+", choices=list(REAL_VARIANTS), default=list(REAL_VARIANTS),
                        help="grids and routes of the real section")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, tuple(args.volume))))
        return
    trained_tiny()  # train once, before the timed children
    if "work" in args.sections:
        work_table()
    if "time" in args.sections:
        time_table(tuple(args.volume), ["floor"] + [m for m in args.methods if m != "floor"])
    if "real" in args.sections:
        real_table(args.real, args.variants)
    if "routes" in args.sections:
        routes_table()
    if "seams" in args.sections:
        seams_table()


if __name__ == "__main__":
    main()
