"""Quality on real chest CT the models never saw: VQGAN3D against MONAI's 3D autoencoders and tricubic down-up.

Protocol (held-apart volumes, BENCHMARKS.md "quality"):

* Six real chest CTs from :mod:`real_ct`, split once in :data:`real_ct.SPLIT`: the models train on
  random patches of ``train`` (lung1, pat4), every choice is made on ``validation`` (pat1, pat2),
  the table reports ``test`` (lung2, pat3). Each volume is block-averaged in-plane to pixels near
  ``--pixel-mm`` 2.3 mm (lung1/lung2 by 4, the pat crops by 2); slices stay (3-5 mm).
* Every learned model trains ``--steps`` on the same patch sequence per seed (``--patch``
  16x32x32, batch 2, each patch from a train volume drawn at random, its centre in the body),
  AdamW, 5% warm-up then cosine decay, the same loss (L1 + ``--ssim-weight`` 0.5 x (1 - 3D SSIM)
  on the [-1, 1] window, the recipe's) plus its own regulariser, parameter counts within 10%,
  the same 4x4x4 latent grid; no adversarial or perceptual loss (this compares autoencoders).
* Each trained model reconstructs every validation and test volume at each inference setting of
  ``--settings``: an explicit patch ``DxHxW`` (overlap 25%), or ``planned``, the grid
  ``CTPAReconstructionPipeline`` plans (here one patch per volume). VQGAN3D goes
  through the pipeline (what a user gets: linear blend, padding to the latent grid); MONAI's
  models through ``sliding_window_inference`` (gaussian blend) on the same patches.
* Each model's *best setting* is the one with the highest validation body PSNR (mean over seeds);
  the test table shows each model at its best setting and at the pipeline's default (``default_setting``:
  the training patch a VQGAN3D without GroupNorm stores, else ``planned``),
  every figure the mean over seeds of the mean over the test volumes, with the range over seeds.

Models (~0.5 M parameters each):

* ``vqgan3d-group`` / ``vqgan3d-none`` / ``vqgan3d-batch``: ``VQGAN3D`` preset ``tiny`` with
  ``norm_type`` GroupNorm (the model before this benchmark), no normalisation (learned
  zero-initialised residual scales) or BatchNorm (running statistics at inference); the
  preset's 256 codes (8 bits per latent voxel) and commitment 0.25, as a user gets them.
  ``vqgan3d-fullres``: no normalisation, in the layout before the presets dropped the ResBlocks at
  full resolution (``full_resolution_blocks=True``).
* ``monai-vqvae``: ``monai.networks.nets.VQVAE``, two stride-2 stages, ``--vqvae-codes`` codes of
  dimension 8 (default 256: the same 8 bits per latent voxel as VQGAN3D), MONAI's EMA decay 0.5
  (with 0.99, as ours, its normal-initialised codebook collapses to 1-2 codes) and its own
  learning rate ``--vqvae-lr`` 1e-3 (at 2e-3 its codebook collapses to 4 codes by step 800).
* ``monai-autoencoderkl``: ``monai.networks.nets.AutoencoderKL`` (the MAISI family, GroupNorm),
  4 continuous latent channels (far more bits per latent voxel), decoded from the latent mean.
* ``tricubic`` (and ``trilinear``): 4x4x4 block mean, ``scipy.ndimage.zoom`` back with order 3 (1).

Figures (:mod:`ctpa_vq.evaluation.metrics`, :mod:`ctpa_vq.evaluation.regions`): PSNR/SSIM in HU over -1024..2048 for
the whole volume and over the body mask, mean absolute HU error over the body.

Every (method, seed, steps, threads) run is appended to ``--results`` (JSON lines) as it ends, and
runs already there are not repeated: an interrupted table resumes, and a later call with more
seeds adds to it. The tables are printed from everything in the file that matches the arguments.

    python benchmarks/quality.py --jobs 2 --threads 1      # the table in BENCHMARKS.md
    python benchmarks/quality.py --smoke                   # seconds: phantoms, 2 steps, every method (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_ct import SPLIT, RealCTUnavailable, load_real_ct  # noqa: E402

from ctpa_vq import VQGAN3D  # noqa: E402
from ctpa_vq.data.phantom import make_phantom  # noqa: E402
from ctpa_vq.evaluation.metrics import reconstruction_metrics  # noqa: E402
from ctpa_vq.evaluation.regions import body_mask, region_labels  # noqa: E402
from ctpa_vq.models.intensity import DEFAULT_HU_WINDOW, hu_to_unit, unit_to_hu  # noqa: E402
from ctpa_vq.pipelines import CTPAReconstructionPipeline  # noqa: E402
from ctpa_vq.pipelines.reconstruction import PLANNED  # noqa: E402
from ctpa_vq.training.losses import dense_weighted_l1, ssim_loss  # noqa: E402
from ctpa_vq.training.pretrained import inference_patch  # noqa: E402

FACTOR = 4
KL_WEIGHT = 1e-6
DENSE_HU = 150.0  # --dense-weight applies from here up: contrast-enhanced vessels and bone
VQGAN_VARIANTS = {  # method -> `tiny` preset overrides
    "vqgan3d-group": dict(norm_type="group"),
    "vqgan3d-none": dict(norm_type="none"),
    "vqgan3d-batch": dict(norm_type="batch"),
    "vqgan3d-fullres": dict(norm_type="none", full_resolution_blocks=True),
}
LEARNED = (*VQGAN_VARIANTS, "monai-vqvae", "monai-autoencoderkl")
CLASSICAL = ("trilinear", "tricubic")
FIGURES = ("psnr", "ssim", "body_psnr", "body_ssim", "mae_body")


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


def sample_patches(
    volumes: list[np.ndarray], patch: tuple[int, int, int], count: int, rng: np.random.Generator
) -> torch.Tensor:
    """``count`` random patches ``(count, 1, *patch)`` in [-1, 1], each from a volume drawn at
    random, whose centre lies in that volume's body."""
    bodies = [body_mask(hu) for hu in volumes]
    patches = []
    while len(patches) < count:
        index = int(rng.integers(len(volumes)))
        hu = volumes[index]
        corner = [int(rng.integers(0, n - p + 1)) for n, p in zip(hu.shape, patch)]
        if bodies[index][tuple(c + p // 2 for c, p in zip(corner, patch))]:
            patches.append(hu[tuple(slice(c, c + p) for c, p in zip(corner, patch))])
    return torch.from_numpy(hu_to_unit(np.stack(patches))[:, None])


def build(method: str, vqvae_codes: int = 256) -> torch.nn.Module:
    """The learned models at ~0.5 M parameters, 4x4x4 spatial compression."""
    from monai.networks.nets import VQVAE, AutoencoderKL

    if method in VQGAN_VARIANTS:
        return VQGAN3D.from_preset("tiny", **VQGAN_VARIANTS[method])
    if method == "monai-vqvae":
        return VQVAE(
            spatial_dims=3, in_channels=1, out_channels=1, channels=(24, 48), num_res_layers=1,
            num_res_channels=(24, 48), downsample_parameters=((2, 4, 1, 1),) * 2,
            upsample_parameters=((2, 4, 1, 1, 0),) * 2, num_embeddings=vqvae_codes, embedding_dim=8,
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
    if method in VQGAN_VARIANTS:
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
    if method in VQGAN_VARIANTS:
        return lambda x: model(x).sample
    if method == "monai-vqvae":
        return lambda x: model(x)[0]
    return model.reconstruct


def optimizer_step(method: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                   args) -> torch.Tensor:
    """One training step on ``batch`` ``(B, 1, D, H, W)``: the loss, its backward, the optimizer's step."""
    loss = training_loss(method, model, batch, args.dense_weight, args.ssim_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


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
        loss = optimizer_step(method, model, optimizer, patches[step * args.batch : (step + 1) * args.batch], args)
        schedule.step()
        if (step + 1) % max(1, args.steps // 5) == 0:
            print(f"  {method} step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
    model.eval()


def step_times(methods: list[str], patches: torch.Tensor, args) -> dict[str, float]:
    """Median seconds per training step (loss, backward, AdamW) of each learned method, the methods
    taking turns step by step in this process on the same batches, so they share the machine's state;
    the first ``--time-steps // 5`` steps of each are warm-up."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {m: build(m, args.vqvae_codes).train() for m in methods}
    optimizers = {m: torch.optim.AdamW(model.parameters(), lr=1e-4) for m, model in models.items()}
    warmup = args.time_steps // 5
    times: dict[str, list[float]] = {m: [] for m in methods}
    for step in range(warmup + args.time_steps):
        batch = patches[step * args.batch : (step + 1) * args.batch]
        for m in methods:
            start = time.perf_counter()
            optimizer_step(m, models[m], optimizers[m], batch, args)
            times[m].append(time.perf_counter() - start)
    return {m: float(np.median(t[warmup:])) for m, t in times.items()}


def _planner() -> CTPAReconstructionPipeline:
    """A pipeline whose only use is its default grid planning (the model's weights do not matter)."""
    pipeline = CTPAReconstructionPipeline(vqgan=VQGAN3D.from_preset("tiny"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def reconstruct(method: str, model: torch.nn.Module, hu: np.ndarray, setting: str, overlap: float) -> np.ndarray:
    """``hu`` ``(D, H, W)`` through ``model`` at inference ``setting`` (``DxHxW`` or ``planned``).

    VQGAN3D: ``CTPAReconstructionPipeline`` (planned: its planner). MONAI's models: MONAI's
    ``sliding_window_inference`` with gaussian weights, on the planned grid's patch for ``planned``.
    """
    patch = None if setting == PLANNED else tuple(int(n) for n in setting.split("x"))
    if method in VQGAN_VARIANTS:
        pipeline = CTPAReconstructionPipeline(vqgan=model)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(hu, patch_size=patch or PLANNED, overlap=None if patch is None else overlap).reconstruction
    from monai.inferers import sliding_window_inference

    if patch is None:
        grid = _planner().patch_grid(hu.shape)
        patch = grid.patch_size
        overlap = max(1 - s / p for s, p in zip(grid.stride, grid.patch_size)) if len(grid) > 1 else 0.0
    unit = torch.from_numpy(hu_to_unit(hu))[None, None]
    out = sliding_window_inference(unit, patch, 1, predictor(method, model), overlap=overlap, mode="gaussian")
    return unit_to_hu(out[0, 0]).numpy()


def figures(reconstruction: np.ndarray, hu: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    m = reconstruction_metrics(reconstruction, hu, DEFAULT_HU_WINDOW, labels=labels)
    return dict(psnr=m.psnr, ssim=m.ssim, body_psnr=m.body_psnr, body_ssim=m.body_ssim, mae_body=m.mae["body"])


def run_key(method: str, seed: int | None, args) -> str:
    """What makes two runs the same run: the method, its seed and every argument that changes the figures."""
    if method in CLASSICAL:
        return f"{method}|{args.pixel_mm}|{args.smoke}"
    lr = args.vqvae_lr if method == "monai-vqvae" else args.lr
    codes = f"|codes {args.vqvae_codes}" if method == "monai-vqvae" else ""
    return (
        f"{method}|seed {seed}|steps {args.steps}|threads {args.threads}|lr {lr}{codes}|patch {args.patch}"
        f"|ssim {args.ssim_weight}|dense {args.dense_weight}|{args.pixel_mm}|{args.smoke}"
    )


def run(method: str, seed: int | None, args, volumes: dict, labels: dict) -> dict:
    """Train ``method`` (seed ``seed``) on the train volumes and score every validation and test
    volume at every inference setting; one JSON-able record. With ``--jobs`` it runs in a worker."""
    record = dict(key=run_key(method, seed, args), method=method, seed=seed, steps=args.steps, threads=args.threads)
    scored = {name: hu for part in ("validation", "test") for name, hu in volumes[part].items()}
    if method in CLASSICAL:
        order = 1 if method == "trilinear" else 3
        record["figures"] = {
            name: {setting: figures(classical(hu, order), hu, labels[name]) for setting in args.settings}
            for name, hu in scored.items()
        }
        return record
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(seed)
    patches = sample_patches(list(volumes["train"].values()), tuple(args.patch), args.steps * args.batch, rng)
    torch.manual_seed(seed)
    model = build(method, args.vqvae_codes)
    start = time.perf_counter()
    train(method, model, patches, args)
    record.update(params=sum(p.numel() for p in model.parameters()), train_s=time.perf_counter() - start)
    record["figures"] = {
        name: {setting: figures(reconstruct(method, model, hu, setting, args.overlap), hu, labels[name])
               for setting in args.settings}
        for name, hu in scored.items()
    }  # fmt: skip
    print(f"{method} seed {seed}: trained in {record['train_s']:.0f} s", flush=True)
    return record


def prepare(args) -> dict[str, dict[str, np.ndarray]]:
    """``{part: {name: (D, H, W) float32 HU}}``: the real split, or small phantoms with ``--smoke``."""
    if args.smoke:
        return {
            part: {f"phantom{2 * i + j}": make_phantom((24, 32, 32), seed=2 * i + j).astype(np.float32) for j in range(2)}
            for i, part in enumerate(SPLIT)
        }
    volumes = {}
    for part, names in SPLIT.items():
        volumes[part] = {}
        for name in names:
            volume = load_real_ct(name)
            inplane = max(1, round(args.pixel_mm / volume.spacing[1]))
            volumes[part][name] = block_mean(volume.hu, (1, inplane, inplane))
    return volumes


def load_records(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {record["key"]: record for record in map(json.loads, path.read_text().splitlines()) if record}


def mean_over(record: dict, names: tuple[str, ...], setting: str, figure: str) -> float:
    return float(np.mean([record["figures"][name][setting][figure] for name in names]))


def default_setting(method: str, patch: list[int]) -> str:
    """The inference setting a user gets from the pipeline by default: the patch the model was trained on
    when training stores it (`ctpa_vq.training.pretrained.inference_patch`: VQGAN3D without GroupNorm,
    25% overlap, as the explicit setting), else the planned grid (MONAI's models: on the same grid)."""
    stored = inference_patch(VQGAN_VARIANTS[method]["norm_type"], patch) if method in VQGAN_VARIANTS else None
    return PLANNED if stored is None else "x".join(map(str, stored))


def tables(records: list[dict], volumes: dict, settings: list[str], patch: list[int]) -> str:
    """The validation table (every setting), the choice per method, and the test table."""
    validation, test = tuple(volumes["validation"]), tuple(volumes["test"])
    methods = list(dict.fromkeys(r["method"] for r in records))
    lines = [
        f"validation ({', '.join(validation)}): body PSNR (dB), mean over the volumes; mean over seeds [range]",
        "| method | seeds | " + " | ".join(settings) + " |",
        "|---|---|" + "---|" * len(settings),
    ]
    best = {}
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        cells, means = [], {}
        for setting in settings:
            values = [mean_over(r, validation, setting, "body_psnr") for r in runs]
            means[setting] = float(np.mean(values))
            cells.append(f"{means[setting]:.2f} [{min(values):.2f}..{max(values):.2f}]")
        best[method] = max(settings, key=means.__getitem__)
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"test ({', '.join(test)}): each figure the mean over the volumes; mean over seeds [range of body PSNR]",
        "| method | inference | seeds | params | train s/step | PSNR | SSIM | body PSNR | body SSIM | MAE body HU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        default = default_setting(method, patch)
        for label, setting in ((f"best on validation: {best[method]}", best[method]), (f"pipeline default: {default}", default)):
            if setting not in settings:
                continue
            per_run = {f: [mean_over(r, test, setting, f) for r in runs] for f in FIGURES}
            body = per_run["body_psnr"]
            step_s = f"{np.mean([r['train_s'] / r['steps'] for r in runs]):.3f}" if "train_s" in runs[0] else "-"
            params = f"{runs[0]['params'] / 1e6:.2f} M" if "params" in runs[0] else "-"
            lines.append(
                f"| {method} | {'-' if method in CLASSICAL else label} | {len(runs)} | {params} | {step_s} | "
                f"{np.mean(per_run['psnr']):.2f} | {np.mean(per_run['ssim']):.4f} | "
                f"{np.mean(body):.2f} [{min(body):.2f}..{max(body):.2f}] | {np.mean(per_run['body_ssim']):.4f} | "
                f"{np.mean(per_run['mae_body']):.1f} |"
            )
            if method in CLASSICAL:
                break  # no inference settings: one row
    lines += [
        "",
        "test body PSNR (dB) per inference setting, mean over seeds; spread: max - min over the settings (of the"
        " means; the largest of one seed)",
        "| method | " + " | ".join(settings) + " | spread | one seed |",
        "|---|" + "---|" * (len(settings) + 2),
    ]
    for method in (m for m in methods if m not in CLASSICAL):
        runs = [r for r in records if r["method"] == method]
        per_seed = np.array([[mean_over(r, test, s, "body_psnr") for s in settings] for r in runs])
        values = per_seed.mean(axis=0)
        one_seed = float((per_seed.max(axis=1) - per_seed.min(axis=1)).max())
        lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {values.max() - values.min():.2f} | {one_seed:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tricubic", *LEARNED], choices=[*CLASSICAL, *LEARNED])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vqvae-lr", type=float, default=1e-3, help="MONAI VQVAE's (its codebook collapses at 2e-3)")
    parser.add_argument("--vqvae-codes", type=int, default=256, help="VQVAE codes (256: VQGAN3D tiny's 8 bits)")
    parser.add_argument("--dense-weight", type=float, default=1.0, help="L1 weight of voxels >= 150 HU (1: plain L1)")
    parser.add_argument("--ssim-weight", type=float, default=0.5, help="weight of 1 - SSIM (3D) added to the L1")
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32], help="training patch (D, H, W)")
    parser.add_argument(
        "--settings", nargs="+", default=["16x32x32", "32x64x64", PLANNED],
        help="inference settings: patches DxHxW (overlap --overlap) and/or 'planned' (the pipeline's planned grid)",
    )  # fmt: skip
    parser.add_argument("--overlap", type=float, default=0.25, help="overlap of explicit inference patches")
    parser.add_argument("--pixel-mm", type=float, default=2.3, help="block-average in-plane to pixels near this size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run per seed")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (part of a run's identity)")
    parser.add_argument("--results", type=Path, default=Path("quality-results.jsonl"), help="JSON lines, appended")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="only time this many training steps of each --methods model, taking turns, and print ms/step")
    parser.add_argument("--smoke", action="store_true", help="seconds: small phantoms for volumes, seed 0, 2 steps, small patches")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.patch, args.settings = 2, [0], [12, 16, 16], ["12x16x16", PLANNED]
        if args.results == parser.get_default("results"):
            args.results = Path(tempfile.mkdtemp()) / "quality-smoke.jsonl"

    try:
        volumes = prepare(args)
    except RealCTUnavailable as err:
        sys.exit(str(err))
    if args.time_steps:
        learned = [m for m in args.methods if m not in CLASSICAL]
        count = (args.time_steps + args.time_steps // 5) * args.batch
        patches = sample_patches(list(volumes["train"].values()), tuple(args.patch), count, np.random.default_rng(0))
        seconds = step_times(learned, patches, args)
        reference = seconds.get("monai-vqvae")
        report = "\n".join(
            [f"training step, batch {args.batch} of {'x'.join(map(str, args.patch))}, {args.threads} thread(s), "
             f"median of {args.time_steps}", "| method | ms/step | / monai-vqvae |", "|---|---|---|"]
            + [f"| {m} | {1000 * t:.1f} | {t / reference:.2f} |" if reference else f"| {m} | {1000 * t:.1f} | - |"
               for m, t in seconds.items()]
        )  # fmt: skip
        print(report)
        return report
    labels = {name: region_labels(hu) for part in ("validation", "test") for name, hu in volumes[part].items()}
    for part, named in volumes.items():
        print(f"{part}: " + ", ".join(f"{name} {hu.shape}" for name, hu in named.items()), flush=True)

    done = load_records(args.results)
    tasks = [(m, None) for m in args.methods if m in CLASSICAL]
    tasks += [(m, seed) for seed in args.seeds for m in args.methods if m not in CLASSICAL]
    todo = [(m, seed) for m, seed in tasks if run_key(m, seed, args) not in done]
    print(f"{len(tasks) - len(todo)} of {len(tasks)} runs already in {args.results}", flush=True)

    def keep(record: dict) -> None:
        done[record["key"]] = record
        with args.results.open("a") as f:  # one line per finished run: an interrupted table resumes
            f.write(json.dumps(record) + "\n")

    if args.jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run, m, seed, args, volumes, labels) for m, seed in todo]):
                keep(future.result())
    else:
        for m, seed in todo:
            keep(run(m, seed, args, volumes, labels))
    report = tables([done[run_key(m, seed, args)] for m, seed in tasks], volumes, args.settings, args.patch)
    print("\n" + report)
    return report


if __name__ == "__main__":
    main()
