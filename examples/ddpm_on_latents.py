"""The DDPM latent contract, end to end, on CPU in about a minute.

1. Load the autoencoder with `VQGAN3D.from_pretrained` (`--model DIR_OR_REPO`). Without `--model`
   a tiny untrained model is built, its latent statistics are measured on phantoms (what
   `ctpa-vq latent-stats` does) and it is saved to a temporary folder and loaded back, so the
   script runs standalone. It trains no autoencoder: the point is the contract, not quality.
2. Encode phantom CT volumes (HU) to whole-volume latent grids with the pipeline's
   `encode_volume` (patch-wise, blended in latent space).
3. Standardise them with the statistics stored in the model's config: `model.scale_latents`.
4. Train a few steps of a diffusers 3D UNet with `DDPMScheduler` (epsilon prediction).
5. Sample with the scheduler loop, `model.unscale_latents`, then `decode_latents` to HU.

The UNet is `diffusers.UNet3DConditionModel`, diffusers' UNet for 5D `(B, C, F, H, W)` input.
It treats the axial axis D as its "frames": 2D convolutions over (H, W), temporal convolutions
and attention across D, downsampling in (H, W) only, so latent H and W must be divisible by
2 ** (levels - 1). Its mid block always cross-attends to `encoder_hidden_states`; we pass one
all-zero token, which makes it unconditional (attention over a single zero token adds a
constant). diffusers' other 3D UNets (`UNetSpatioTemporalConditionModel`, `I2VGenXLUNet`,
`UNetMotionModel`) need more conditioning inputs, and it has no plain 3D-conv UNet.
`clip_sample=False`: standardised latents are not confined to [-1, 1].

Run: `python examples/ddpm_on_latents.py [--model DIR_OR_REPO] [--output samples.npz]`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet3DConditionModel
from tqdm.auto import tqdm

from ctpa_vq import VQGAN3D
from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.latent_stats import compute_latent_stats, write_latent_stats
from ctpa_vq.pipelines import CTPAReconstructionPipeline

CROSS_ATTENTION_DIM = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="VQGAN3D or pipeline folder, or Hub repo id (default: a tiny demo model)")
    parser.add_argument("--subfolder", default=None, help="model subfolder in a Hub pipeline repo (e.g. vqgan)")
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), metavar=("D", "H", "W"), help="phantom size")
    parser.add_argument("--num-volumes", type=int, default=4, help="phantoms to train on")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--inference-steps", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write decoded samples (N, D, H, W) HU to this .npz")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def phantoms(shape: tuple[int, int, int], n: int, first_seed: int) -> list[np.ndarray]:
    return [make_phantom(shape, seed=first_seed + i) for i in range(n)]


def build_demo_model(folder: Path, shape: tuple[int, int, int]) -> Path:
    """A tiny untrained VQGAN3D with latent statistics measured on phantoms, saved to `folder`."""
    model = VQGAN3D.from_preset("tiny")
    model.save_pretrained(folder)
    pipe = CTPAReconstructionPipeline(vqgan=model)
    pipe.set_progress_bar_config(disable=True)
    stats = compute_latent_stats(pipe.encode_volume, phantoms(shape, 2, first_seed=1000))
    write_latent_stats(model, stats, folder)
    return folder


def load_model(name_or_path: str, subfolder: str | None) -> VQGAN3D:
    """`VQGAN3D.from_pretrained`, finding the model inside a local pipeline folder by itself."""
    if subfolder is None and (Path(name_or_path) / "model_index.json").is_file():
        subfolder = "vqgan"
    return VQGAN3D.from_pretrained(name_or_path, subfolder=subfolder)


def build_unet(latent_channels: int) -> UNet3DConditionModel:
    return UNet3DConditionModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "UpBlock3D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=4,
    )


def no_condition(batch: int) -> torch.Tensor:
    """One all-zero "text" token per sample: the UNet's cross-attention then conditions on nothing."""
    return torch.zeros(batch, 1, CROSS_ATTENTION_DIM)


def train(unet, scheduler, latents: torch.Tensor, steps: int, lr: float, progress: bool) -> list[float]:
    """Epsilon-prediction DDPM training on scaled latents `(N, C, d, h, w)`; returns the losses."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    losses = []
    for _ in tqdm(range(steps), desc="train DDPM", disable=not progress):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=no_condition(latents.shape[0])).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def sample(unet, scheduler, shape: tuple[int, ...], inference_steps: int, progress: bool) -> torch.Tensor:
    """The DDPM reverse loop from Gaussian noise; returns scaled latents of `shape` `(N, C, d, h, w)`."""
    unet.eval()
    scheduler.set_timesteps(inference_steps)
    x = torch.randn(shape)
    for t in tqdm(scheduler.timesteps, desc="sample", disable=not progress):
        epsilon = unet(x, t, encoder_hidden_states=no_condition(shape[0])).sample
        x = scheduler.step(epsilon, t, x).prev_sample
    return x


def run(args: argparse.Namespace) -> np.ndarray:
    """The whole contract; returns decoded samples `(N, D, H, W)` in HU."""
    torch.manual_seed(args.seed)
    shape = tuple(args.shape)
    progress = not args.no_progress
    with tempfile.TemporaryDirectory() as tmp:
        name_or_path = args.model or str(build_demo_model(Path(tmp) / "vqgan", shape))
        model = load_model(name_or_path, args.subfolder)
    pipe = CTPAReconstructionPipeline(vqgan=model)
    pipe.set_progress_bar_config(disable=True)

    latents = torch.cat([pipe.encode_volume(hu) for hu in phantoms(shape, args.num_volumes, first_seed=0)])
    latent_shape = model.latent_shape(shape)
    assert tuple(latents.shape[1:]) == latent_shape, (latents.shape, latent_shape)
    if any(n % 2 for n in latent_shape[2:]):
        raise ValueError(f"latent H and W must be even for this UNet, got latent shape {latent_shape}")
    scaled = model.scale_latents(latents)
    print(f"latents {tuple(latents.shape)}; scaled to mean {scaled.mean().item():+.3f}, std {scaled.std().item():.3f}")

    unet = build_unet(latent_shape[0])
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    losses = train(unet, scheduler, scaled, args.train_steps, args.lr, progress)
    print(f"DDPM loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")

    samples = sample(unet, scheduler, (args.num_samples, *latent_shape), args.inference_steps, progress)
    latents_out = model.unscale_latents(samples)
    volumes = np.stack([pipe.decode_latents(z[None], volume_shape=shape) for z in latents_out])
    print(f"decoded samples {volumes.shape} HU in [{volumes.min():.0f}, {volumes.max():.0f}], window {list(model.config.hu_window)}")
    if args.output:
        np.savez(args.output, samples=volumes, hu_window=np.asarray(model.config.hu_window, dtype=np.float32))
    return volumes


if __name__ == "__main__":
    run(parse_args())
