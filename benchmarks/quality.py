"""Quality on real chest CT: VQGAN3D against MONAI's 3D autoencoders and classical down-up sampling.

Every learned model trains on random patches of one real volume (``lung1``, 48x512x512) and is
scored on the whole other volume (``lung2``, 61x512x512), both from :mod:`real_ct`. Same data,
same patch size and patch sequence, same 4x4x4 spatial compression, same optimiser, schedule and
number of steps (one learning rate, except for MONAI's VQVAE, below), parameter counts within 10%
of each other; the same loss for every model: L1 plus ``--ssim-weight`` 0.5 x (1 - 3D SSIM) on the
[-1, 1] window (``ctpa_vq.training.losses``, the recipe's ``model.ssim_weight``), plus each model's
own regulariser (VQ commitment, MONAI VQ loss, KL for AutoencoderKL). No adversarial or perceptual
loss: this compares the autoencoders, not GAN recipes.

* ``vqgan3d-ema`` / ``vqgan3d-fsq``: ``VQGAN3D`` preset ``tiny`` with ``--vqgan-codes`` 4096 EMA
  codes (12 bits per latent voxel; the preset's 256: 0.9 dB lower body PSNR on seed 0,
  BENCHMARKS.md) and commitment weight ``--vqgan-commitment`` 0.1 (0.25, the package default:
  every figure slightly worse over three seeds) and FSQ with levels (8, 6, 5) = 240 codes, scored
  through ``CTPAReconstructionPipeline`` (its defaults, what a user gets: each patch encoded,
  quantised and decoded, the decoded patches blended with linear ramps, 0.2-0.3 dB above its
  gaussian blend; the volume is padded at the end to a multiple of 4, the latent grid's
  contract) and, as ``...-monai-window``, the same model per patch through MONAI's
  ``sliding_window_inference`` (gaussian weights clamped at 1e-3, so overlapping patch borders
  are averaged; the last patch moved inward instead of padding).
* ``monai-vqvae``: ``monai.networks.nets.VQVAE``, two stride-2 stages, 256 codes of dimension 8,
  MONAI's EMA decay 0.5 (with 0.99, as ours, its normal-initialised codebook collapses to 1-2 codes)
  and its own learning rate ``--vqvae-lr`` 1e-3 (at 2e-3 its codebook collapses to 4 codes by step 800).
* ``monai-autoencoderkl``: ``monai.networks.nets.AutoencoderKL`` (the MAISI family), two
  downsamplings, 4 continuous latent channels (far more bits per latent voxel than the 12 bits of
  a 4096-code index); decoded from the latent mean. "Same compression" is the spatial factor
  4x4x4 of the latent grid, as the issue sets it, not the same bits.
* ``trilinear`` / ``tricubic``: 4x4x4 block mean (the same latent grid size), then
  ``scipy.ndimage.zoom`` back with order 1 / 3.

The MONAI models and the ``-monai-window`` rows are scored with ``sliding_window_inference`` on
the same patch size, whose patch is the training patch by default: all these models normalise with
GroupNorm over the patch, and a 32x128x128 inference patch (16x the voxels seen in training)
cost one VQGAN3D run 0.22 body SSIM and 38 HU in lung and made runs look bimodal (another run
it served better in PSNR, worse in lung; BENCHMARKS.md).

Figures (see :mod:`ctpa_vq.metrics` and :mod:`ctpa_vq.regions`): PSNR/SSIM in HU over
the window -1024..2048 for the whole volume and over the body, and mean absolute HU error per
region. By default the volumes are block-averaged 4x in-plane (128x128, 2.3-2.5 mm pixels, 5 mm
slices) so the benchmark runs on CPU cores in minutes; ``--inplane 1`` keeps full resolution.

Every learned model trains 2400 steps once per seed (0, 1, 2: patch sequence and initialisation),
and the last table is the mean over seeds: at 800 steps one model's body PSNR moved by up to
3.9 dB between seeds, more than the models differ, and every model was 2.4-3.6 dB short of
where 2400 steps take it (BENCHMARKS.md).

    python benchmarks/quality.py --jobs 2 --threads 1   # the table in BENCHMARKS.md (about 25 min on 2 cores)
    python benchmarks/quality.py --steps 20 --seeds 0 --methods trilinear vqgan3d-ema   # a quick look
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import RealCTUnavailable, load_real_ct  # noqa: E402

from ctpa_vq import VQGAN3D  # noqa: E402
from ctpa_vq.intensity import DEFAULT_HU_WINDOW, hu_to_unit, unit_to_hu  # noqa: E402
from ctpa_vq.metrics import ReconstructionMetrics, reconstruction_metrics  # noqa: E402
from ctpa_vq.pipelines import CTPAReconstructionPipeline  # noqa: E402
from ctpa_vq.regions import REGIONS, body_mask, region_labels  # noqa: E402
from ctpa_vq.training.losses import dense_weighted_l1, ssim_loss  # noqa: E402

FACTOR = 4
KL_WEIGHT = 1e-6
DENSE_HU = 150.0  # --dense-weight applies from here up: contrast-enhanced vessels and bone
LEARNED = ("vqgan3d-ema", "vqgan3d-fsq", "monai-vqvae", "monai-autoencoderkl")
CLASSICAL = ("trilinear", "tricubic")


@dataclass
class Row:
    method: str
    params: int
    train_s: float
    infer_s: float
    metrics: ReconstructionMetrics
    seed: int | None = None  # None: a classical row, the same for every seed


def block_mean(hu: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """Average ``factor`` blocks of ``(D, H, W)`` (edge-replicated to a multiple first), float32."""
    pad = [(0, -n % f) for n, f in zip(hu.shape, factor)]
    padded = np.pad(hu.astype(np.float32), pad, mode="edge")
    d, h, w = (n // f for n, f in zip(padded.shape, factor))
    return padded.reshape(d, factor[0], h, factor[1], w, factor[2]).mean(axis=(1, 3, 5))


def classical(hu: np.ndarray, order: int) -> np.ndarray:
    """4x4x4 block mean, then a spline of ``order`` back to ``hu``'s exact shape."""
    low = block_mean(hu, (FACTOR,) * 3)
    zoom = [n / m for n, m in zip(hu.shape, low.shape)]
    return ndimage.zoom(low, zoom, order=order, mode="nearest", grid_mode=True)


def sample_patches(hu: np.ndarray, patch: tuple[int, int, int], count: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random patches ``(count, 1, *patch)`` in [-1, 1] whose centre lies in the body."""
    body = body_mask(hu)
    patches = []
    while len(patches) < count:
        corner = [int(rng.integers(0, n - p + 1)) for n, p in zip(hu.shape, patch)]
        if body[tuple(c + p // 2 for c, p in zip(corner, patch))]:
            patches.append(hu[tuple(slice(c, c + p) for c, p in zip(corner, patch))])
    return torch.from_numpy(hu_to_unit(np.stack(patches))[:, None])


def build(method: str, vqgan_codes: int = 4096, vqgan_commitment: float = 0.1) -> torch.nn.Module:
    """The learned models at ~0.5 M parameters, 4x4x4 spatial compression."""
    from monai.networks.nets import VQVAE, AutoencoderKL

    if method == "vqgan3d-ema":
        return VQGAN3D.from_preset("tiny", num_vq_embeddings=vqgan_codes, commitment_weight=vqgan_commitment)
    if method == "vqgan3d-fsq":
        return VQGAN3D.from_preset("tiny", quantizer_type="fsq", vq_embed_dim=3, fsq_levels=(8, 6, 5))
    if method == "monai-vqvae":
        return VQVAE(
            spatial_dims=3, in_channels=1, out_channels=1, channels=(24, 48), num_res_layers=1,
            num_res_channels=(24, 48), downsample_parameters=((2, 4, 1, 1),) * 2,
            upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=256, embedding_dim=8,
        )  # fmt: skip
    if method == "monai-autoencoderkl":
        return AutoencoderKL(
            spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2, channels=(8, 16, 40),
            attention_levels=(False, False, False), latent_channels=4, norm_num_groups=4,
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        )  # fmt: skip
    raise ValueError(method)


def weighted_l1(reconstruction: torch.Tensor, x: torch.Tensor, dense_weight: float) -> torch.Tensor:
    """L1 with voxels >= ``DENSE_HU`` (enhanced vessels, bone) weighted ``dense_weight``: the recipe's loss."""
    return dense_weighted_l1(reconstruction, x, dense_weight, float(hu_to_unit(np.float32([DENSE_HU]))[0]))


def training_loss(
    method: str, model: torch.nn.Module, x: torch.Tensor, dense_weight: float = 1.0, ssim_weight: float = 0.0
) -> torch.Tensor:
    """(Weighted) L1 + ``ssim_weight * (1 - SSIM)`` in [-1, 1] (the recipe's losses) + the model's regulariser."""
    if method.startswith("vqgan3d"):
        out = model(x)
        reconstruction, regulariser = out.sample, out.commitment_loss
    elif method == "monai-vqvae":
        reconstruction, regulariser = model(x)
    else:
        reconstruction, mu, sigma = model(x)
        kl = 0.5 * (mu.square() + sigma.square() - torch.log(sigma.square() + 1e-12) - 1).sum() / x.shape[0]
        regulariser = KL_WEIGHT * kl
    loss = weighted_l1(reconstruction, x, dense_weight) + regulariser
    return loss + ssim_weight * ssim_loss(reconstruction, x) if ssim_weight else loss


def predictor(method: str, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patch -> reconstructed patch, both ``(B, 1, D, H, W)`` in [-1, 1]."""
    if method.startswith("vqgan3d"):
        return lambda x: model(x).sample
    if method == "monai-vqvae":
        return lambda x: model(x)[0]
    return model.reconstruct


def train(method: str, model: torch.nn.Module, patches: torch.Tensor, args) -> None:
    """AdamW, linear warm-up over 5% of the steps then cosine decay, batches in a fixed order."""
    lr = args.vqvae_lr if method == "monai-vqvae" else args.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for step in range(args.steps):
        batch = patches[step * args.batch : (step + 1) * args.batch]
        loss = training_loss(method, model, batch, args.dense_weight, args.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {method} step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
    model.eval()


@torch.no_grad()
def sliding_window(method: str, model: torch.nn.Module, hu: np.ndarray, args) -> np.ndarray:
    """Each patch through the whole model, blended in pixels with gaussian weights (MONAI)."""
    from monai.inferers import sliding_window_inference

    unit = torch.from_numpy(hu_to_unit(hu))[None, None]
    out = sliding_window_inference(
        unit, tuple(args.infer_patch), 1, predictor(method, model), overlap=args.overlap, mode="gaussian"
    )
    return unit_to_hu(out[0, 0]).numpy()


def pipeline_route(model: VQGAN3D, hu: np.ndarray, args) -> np.ndarray:
    """The package's defaults: each patch encoded, quantised, decoded; decoded patches blended with linear ramps."""
    pipeline = CTPAReconstructionPipeline(vqgan=model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(hu, patch_size=tuple(args.infer_patch), overlap=args.overlap).reconstruction


def prepare(args) -> tuple[np.ndarray, np.ndarray]:
    volumes = []
    for name in ("lung1", "lung2"):
        hu = load_real_ct(name).hu
        if args.inplane > 1:
            hu = block_mean(hu, (1, args.inplane, args.inplane))
        volumes.append(hu.astype(np.float32))
    return volumes[0], volumes[1]


def print_table(rows: list[Row], title: str) -> None:
    names = " | ".join(f"MAE {r}" for r in REGIONS)
    print(f"\n{title}\n| method | params | train s | infer s | PSNR | SSIM | body PSNR | body SSIM | MAE body | {names} |")
    print("|" + "---|" * (9 + len(REGIONS)))
    for row in rows:
        m = row.metrics
        maes = " | ".join(f"{m.mae[r]:.1f}" for r in REGIONS)
        print(
            f"| {row.method} | {row.params / 1e6:.2f} M | {row.train_s:.0f} | {row.infer_s:.0f} | {m.psnr:.2f} | "
            f"{m.ssim:.4f} | {m.body_psnr:.2f} | {m.body_ssim:.4f} | {m.mae['body']:.1f} | {maes} |"
        )
    print("PSNR/SSIM in HU over -1024..2048 (whole volume, then body mask); MAE in HU per region (ctpa_vq.regions)")


def seed_means(rows: list[Row]) -> list[Row]:
    """One row per method, every figure averaged over its seeds, named with the range of its body PSNR."""
    means = []
    for method in dict.fromkeys(row.method for row in rows):
        runs = [row for row in rows if row.method == method]
        window = runs[0].metrics.window

        def mean(figure: Callable[[ReconstructionMetrics], float]) -> float:
            return float(np.mean([figure(run.metrics) for run in runs]))

        metrics = ReconstructionMetrics(
            mean(lambda m: m.psnr), mean(lambda m: m.ssim), window, mean(lambda m: m.body_psnr),
            mean(lambda m: m.body_ssim), {name: mean(lambda m, name=name: m.mae[name]) for name in runs[0].metrics.mae},
        )  # fmt: skip
        body_psnrs = [run.metrics.body_psnr for run in runs]
        label = method if len(runs) == 1 else f"{method} (body PSNR {min(body_psnrs):.2f}..{max(body_psnrs):.2f})"
        train_s, infer_s = np.mean([run.train_s for run in runs]), np.mean([run.infer_s for run in runs])
        means.append(Row(label, runs[0].params, float(train_s), float(infer_s), metrics))
    return means


def score(reconstruction: np.ndarray, test_hu: np.ndarray, labels: np.ndarray) -> ReconstructionMetrics:
    return reconstruction_metrics(reconstruction, test_hu, DEFAULT_HU_WINDOW, labels=labels)


def learned_rows(
    method: str, seed: int, args, train_hu: np.ndarray, test_hu: np.ndarray, labels: np.ndarray
) -> list[Row]:
    """Train ``method`` on seed ``seed``'s patch sequence of ``train_hu`` and score each of its
    routes on ``test_hu`` (region ``labels``).

    One task of the run; with ``--jobs`` it runs in a worker process of its own.
    """
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    patches = sample_patches(train_hu, tuple(args.patch), args.steps * args.batch, np.random.default_rng(seed))
    torch.manual_seed(seed)
    model = build(method, args.vqgan_codes, args.vqgan_commitment)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    train(method, model, patches, args)
    train_s = time.perf_counter() - start
    routes = [(method, lambda: sliding_window(method, model, test_hu, args))]
    if method.startswith("vqgan3d"):
        routes = [(method, lambda: pipeline_route(model, test_hu, args))]
        if not args.no_monai_window:
            routes.append((f"{method}-monai-window", lambda: sliding_window(method, model, test_hu, args)))
    rows = []
    for name, run in routes:
        start = time.perf_counter()
        reconstruction = run()
        rows.append(Row(name, params, train_s, time.perf_counter() - start, score(reconstruction, test_hu, labels), seed))
        print(f"seed {seed} {name}: {rows[-1].metrics}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=[*CLASSICAL, *LEARNED], choices=[*CLASSICAL, *LEARNED])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vqvae-lr", type=float, default=1e-3, help="MONAI VQVAE's (its codebook collapses at 2e-3)")
    parser.add_argument("--dense-weight", type=float, default=1.0, help="L1 weight of voxels >= 150 HU (1: plain L1)")
    parser.add_argument(
        "--ssim-weight", type=float, default=0.5, help="weight of 1 - SSIM (3D) added to every model's L1 (0: L1 only)"
    )
    parser.add_argument("--vqgan-codes", type=int, default=4096, help="EMA codebook size of the vqgan3d-ema row")
    parser.add_argument(
        "--vqgan-commitment", type=float, default=0.1,
        help="commitment weight of the vqgan3d-ema row (the package default 0.25: 0.13 dB lower, BENCHMARKS.md)",
    )  # fmt: skip
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32], help="training patch (D, H, W)")
    parser.add_argument(
        "--infer-patch", type=int, nargs=3, default=None, help="inference patch (D, H, W); default: the training patch"
    )
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--inplane", type=int, default=4, help="block-average this factor in-plane first (1: none)")
    parser.add_argument("--no-monai-window", action="store_true", help="skip VQGAN3D through MONAI's sliding window")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run per seed (patch sequence and initialisation); "
        "with several, a table per seed and one of the means"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="train this many (method, seed) runs at once, each in its own process"
    )
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads per run (default: the cores shared out over --jobs; 1 on a shared machine, where "
        "oversubscribed OpenMP spins)",
    )  # fmt: skip
    args = parser.parse_args()
    args.infer_patch = args.infer_patch or args.patch

    try:
        train_hu, test_hu = prepare(args)
    except RealCTUnavailable as err:
        sys.exit(str(err))
    labels = region_labels(test_hu)
    counts = np.bincount(labels.ravel(), minlength=len(REGIONS) + 1)
    print(
        f"train lung1 {train_hu.shape}, test lung2 {test_hu.shape} (in-plane /{args.inplane}); lung2 voxels: "
        + ", ".join(f"{r} {c}" for r, c in zip(("outside", *REGIONS), counts)),
        flush=True,
    )

    rows: list[Row] = []
    for method in (m for m in args.methods if m in CLASSICAL):
        start = time.perf_counter()
        reconstruction = classical(test_hu, order=1 if method == "trilinear" else 3)
        rows.append(Row(method, 0, 0.0, time.perf_counter() - start, score(reconstruction, test_hu, labels)))
        print(f"{method}: {rows[-1].metrics}", flush=True)
    tasks = [(method, seed) for seed in args.seeds for method in args.methods if method not in CLASSICAL]
    if args.jobs > 1 and tasks:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            data = [[value] * len(tasks) for value in (args, train_hu, test_hu, labels)]
            done = list(pool.map(learned_rows, *zip(*tasks), *data))
    else:
        done = [learned_rows(method, seed, args, train_hu, test_hu, labels) for method, seed in tasks]
    rows += [row for task_rows in done for row in task_rows]
    classical_rows = [row for row in rows if row.seed is None]
    for seed in args.seeds:
        print_table(classical_rows + [row for row in rows if row.seed == seed], f"seed {seed}, inference patch {args.infer_patch}")
    if len(args.seeds) > 1:
        print_table(seed_means(rows), f"mean of seeds {args.seeds} (the range of body PSNR in brackets)")


if __name__ == "__main__":
    main()
