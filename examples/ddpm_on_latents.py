"""The DDPM latent contract, end to end, on CPU in about a minute: train on an encoded dataset.

1. The table: `ctpa-vq encode` output (`--latents DIR`, with the `--model` that encoded it). Without
   them, the script makes one: a tiny untrained model whose latent statistics are measured on
   phantoms (what `ctpa-vq latent-stats` does), phantom CT volumes written as NIfTI, and
   `ctpa_vq.latents.encode.encode_dataset` over them, so it runs standalone. It trains no autoencoder:
   the point is the contract, not quality.
2. Read the table (`load_encoded`) and train on its `latents_scaled` column: the whole-volume
   latent grids, standardised with the statistics stored in the model's config.
3. Train a few steps of a diffusers 3D UNet with `DDPMScheduler` (epsilon prediction).
4. Sample with the scheduler loop, `model.unscale_latents`, then `decode_latents` to HU.

The UNet is `diffusers.UNet3DConditionModel`, diffusers' UNet for 5D `(B, C, F, H, W)` input.
It treats the axial axis D as its "frames": 2D convolutions over (H, W), temporal convolutions
and attention across D, downsampling in (H, W) only, so latent H and W must be divisible by
2 ** (levels - 1). Its mid block always cross-attends to `encoder_hidden_states`; we pass one
all-zero token, which makes it unconditional (attention over a single zero token adds a
constant). diffusers' other 3D UNets (`UNetSpatioTemporalConditionModel`, `I2VGenXLUNet`,
`UNetMotionModel`) need more conditioning inputs, and it has no plain 3D-conv UNet.
`clip_sample=False`: standardised latents are not confined to [-1, 1]. Volumes of different
sizes give latent grids of different sizes; this example trains on those of the most common
size (a real DDPM crops or pads them to one size).

Run: `python examples/ddpm_on_latents.py [--latents DIR --model DIR_OR_REPO] [--output samples.npz]`.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet3DConditionModel
from tqdm.auto import tqdm

from ctpa_vq import VQGAN3D
from ctpa_vq.data.phantom import make_phantom, write_phantom_dir
from ctpa_vq.hub.model_source import resolve_model
from ctpa_vq.latents.encode import encode_dataset, latents_as_tensor, load_encoded
from ctpa_vq.latents.stats import compute_latent_stats, write_latent_stats
from ctpa_vq.pipelines import CTPAReconstructionPipeline
from ctpa_vq.utils.atomic import atomic_path

CROSS_ATTENTION_DIM = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=Path, default=None, help="`ctpa-vq encode` output (default: encode phantoms)")
    parser.add_argument("--model", default=None, help="the VQGAN3D or pipeline folder, or Hub repo id, that encoded "
                        "--latents (default: a tiny demo model)")
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 32, 32), metavar=("D", "H", "W"), help="phantom size")
    parser.add_argument("--num-volumes", type=int, default=4, help="phantoms to encode and train on")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--inference-steps", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="write decoded samples (N, D, H, W) HU to this .npz")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def build_demo_model(folder: Path, shape: tuple[int, int, int]) -> Path:
    """A tiny untrained VQGAN3D with latent statistics measured on phantoms, saved to `folder`."""
    model = VQGAN3D.from_preset("tiny")
    model.save_pretrained(folder)
    pipe = CTPAReconstructionPipeline(vqgan=model)
    pipe.set_progress_bar_config(disable=True)
    stats = compute_latent_stats(pipe.encode_volume, (make_phantom(shape, seed=1000 + i) for i in range(2)))
    write_latent_stats(model, stats, folder)
    return folder


def load_model(name_or_path: str) -> VQGAN3D:
    """The `VQGAN3D` of a pipeline or model folder or Hub repo (`ctpa_vq.hub.model_source.resolve_model`)."""
    source = resolve_model(name_or_path)
    return VQGAN3D.from_pretrained(source.location, subfolder=source.subfolder)


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


def encode_phantoms(folder: Path, model_dir: Path, shape: tuple[int, int, int], n: int) -> Path:
    """What `ctpa-vq encode` does for a NIfTI folder, on `n` phantoms; returns the table's folder."""
    write_phantom_dir(folder / "nifti", n, shape, seed=0, compressed=False)
    encode_dataset(model_dir, folder / "nifti", folder / "latents", patch_size=shape, progress=False,
                   pseudonymise=str)  # phantoms: no patient to protect, no key to create
    return folder / "latents"


def read_scaled_latents(latents_dir: Path, cache_dir: Path) -> torch.Tensor:
    """`latents_scaled` of the table's rows with the most common latent shape, as `(N, C, d, h, w)`."""
    table = load_encoded(latents_dir, cache_dir=str(cache_dir)).with_format("numpy")
    shapes = collections.Counter(tuple(int(n) for n in s) for s in table["latent_shape"])
    common, count = shapes.most_common(1)[0]
    print(f"{len(table)} encoded volumes; training on the {count} with latent shape {common}")
    return torch.stack([latents_as_tensor(row) for row in table if tuple(int(n) for n in row["latent_shape"]) == common])


def run(args: argparse.Namespace) -> np.ndarray:
    """The whole contract; returns decoded samples `(N, D, H, W)` in HU."""
    if (args.latents is None) != (args.model is None):
        raise SystemExit("give both --latents and the --model that encoded them, or neither (a standalone demo)")
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.latents is None:
            model_dir = build_demo_model(tmp / "vqgan", tuple(args.shape))
            args.model, args.latents = str(model_dir), encode_phantoms(tmp, model_dir, tuple(args.shape), args.num_volumes)
        scaled = read_scaled_latents(args.latents, tmp / "cache")
        model = load_model(args.model)
    pipe = CTPAReconstructionPipeline(vqgan=model)
    pipe.set_progress_bar_config(disable=True)

    latent_shape = tuple(scaled.shape[1:])
    if latent_shape[0] != model.config.vq_embed_dim:
        raise ValueError(f"{args.latents}: latents have {latent_shape[0]} channels, the model {model.config.vq_embed_dim}")
    if any(n % 2 for n in latent_shape[2:]):
        raise ValueError(f"latent H and W must be even for this UNet, got latent shape {latent_shape}")
    print(f"scaled latents {tuple(scaled.shape)}: mean {scaled.mean().item():+.3f}, std {scaled.std().item():.3f}")

    unet = build_unet(latent_shape[0])
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    losses = train(unet, scheduler, scaled, args.train_steps, args.lr, progress)
    print(f"DDPM loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")

    samples = sample(unet, scheduler, (args.num_samples, *latent_shape), args.inference_steps, progress)
    latents_out = model.unscale_latents(samples)
    volume_shape = [n * f for n, f in zip(latent_shape[1:], model.config.downsample_factor)]
    volumes = np.stack([pipe.decode_latents(z[None], volume_shape=volume_shape) for z in latents_out])
    print(f"decoded samples {volumes.shape} HU in [{volumes.min():.0f}, {volumes.max():.0f}], window {list(model.config.hu_window)}")
    if args.output:
        with atomic_path(args.output, ".npz") as temporary:
            np.savez(temporary, samples=volumes, hu_window=np.asarray(model.config.hu_window, dtype=np.float32))
    return volumes


if __name__ == "__main__":
    run(parse_args())
