"""`VQGAN3D`: the 3D VQ-GAN autoencoder (encoder, quantizer, decoder) and its latent contract."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.autoencoders.vq_model import VQEncoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, is_accelerate_available

from .blocks import Decoder3D, Encoder3D, stage_strides
from .intensity import DEFAULT_HU_WINDOW
from .quantizer import EMAVectorQuantizer, FiniteScalarQuantizer, QuantizerOutput

logger = logging.getLogger(__name__)

DEFAULT_FSQ_LEVELS = (8, 5, 5, 5)


@dataclass
class VQGAN3DOutput(BaseOutput):
    """Output of `VQGAN3D.forward`.

    Attributes:
        sample: reconstruction `(B, C, D, H, W)` in the model's [-1, 1] range.
        commitment_loss: scalar.
        perplexity: scalar, exp(entropy) of this step's code histogram.
        codebook_usage: scalar in [0, 1], fraction of codes used in this step.
        indices: code indices `(B, d, h, w)`.
    """

    sample: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    codebook_usage: torch.Tensor
    indices: torch.Tensor


class VQGAN3D(ModelMixin, ConfigMixin):
    r"""A 3D VQ-GAN for CT volumes in the [-1, 1] intensity range of `hu_window`.

    The generator only: discriminators and perceptual networks live with the training code,
    so loading for inference needs neither (nor a network, nor a GPU).

    Parameters:
        in_channels / out_channels: image channels (1 for CT).
        block_out_channels: width of each resolution level; `len - 1` downsampling stages.
        layers_per_block: ResBlocks per level in the encoder (decoder uses one more).
        downsample_factor: total downsampling per axis (D, H, W), powers of 2, e.g. (4, 4, 4).
        latent_channels: channels of the encoder's output before the 1x1x1 pre-quant conv.
        quantizer_type: `"ema"` (EMA codebook) or `"fsq"` (finite scalar quantization).
        num_vq_embeddings / vq_embed_dim: codebook size and code dimension (EMA).
        fsq_levels: levels per channel (FSQ); `vq_embed_dim` must equal `len(fsq_levels)`
            (`from_preset` sets it so when FSQ is asked for without an explicit `vq_embed_dim`).
        commitment_weight / ema_decay / dead_code_threshold: EMA quantizer settings; the threshold
            is a share in [0, 1) of the mean code count (see `EMAVectorQuantizer`).
        norm_num_groups: GroupNorm groups.
        norm_type: the encoder's and decoder's normalisation, one of `NORM_TYPES` (`blocks.py`):
            `"group"` (GroupNorm over each patch; configs saved before this option load as it),
            `"none"` (no normalisation, zero-initialised residual scales) or `"batch"` (BatchNorm,
            running statistics at inference); with the last two a voxel's reconstruction does
            not depend on the rest of the inference patch.
        hu_window: (low, high) HU mapped to [-1, 1]; how outputs turn back into HU.
        latents_mean / latents_std: per-channel statistics of the continuous latents that a
            downstream diffusion model should standardise with (see `scale_latents`); `None`
            until computed (`ctpa-vq latent-stats`).
        training_data: the input specification of the data the model was (last) trained on:
            spacing, HU window, clipped fraction, orientation, patch size, volume count
            (`ctpa_vq.models.input_spec`); `None` for models exported before it was recorded.
        finetuned_from: the model this one was fine-tuned from, `{"source": "hub", "repo_id",
            "revision"}` or `{"source": "local"}`; `None` for a model trained from scratch.
        (The last two are records only: they change nothing the model computes.)
        inference_patch_size: the `(D, H, W)` patch `CTPAReconstructionPipeline` reconstructs with
            by default (25% overlap); `None`: its planned grid. Training stores its own patch here
            for a model without GroupNorm, which scores best on the patch it was trained on
            (BENCHMARKS.md, quality on real chest CT); a GroupNorm model keeps the planned grid.
        full_resolution_blocks: `True` (configs saved before this option): level 0 has ResBlocks
            at the input's resolution. `False` (the presets): the encoder's input conv is its first
            downsampling and the decoder ends in a sub-pixel conv (`SubpixelConv3d`), so
            nothing but those two convolutions touches full resolution (3.1x faster per training
            step and better on held-apart CT, BENCHMARKS.md); `block_out_channels[0]` is then the
            width of the input conv only.
    """

    _supports_gradient_checkpointing = True
    # The codebook stays fp32 under `torch_dtype=bf16` either way diffusers loads: through Accelerate's
    # meta-device path only if named here (it casts every other floating tensor); without Accelerate by
    # `load_state_dict` into the fp32 buffers `EMAVectorQuantizer` creates. diffusers refuses to load at
    # all without Accelerate when this is set, so it is set only where Accelerate is installed.
    _keep_in_fp32_modules = ["quantizer"] if is_accelerate_available() else None

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        block_out_channels: Sequence[int] = (32, 64, 128),
        layers_per_block: int = 1,
        downsample_factor: Sequence[int] = (4, 4, 4),
        latent_channels: int = 8,
        quantizer_type: str = "ema",
        num_vq_embeddings: int = 1024,
        vq_embed_dim: int = 8,
        fsq_levels: Sequence[int] = DEFAULT_FSQ_LEVELS,
        commitment_weight: float = 0.25,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.05,
        norm_num_groups: int = 8,
        norm_type: str = "group",
        hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        training_data: dict | None = None,
        finetuned_from: dict | None = None,
        inference_patch_size: Sequence[int] | None = None,
        full_resolution_blocks: bool = True,
    ):
        super().__init__()
        strides = stage_strides(downsample_factor, len(block_out_channels) - 1)
        if not strides and not full_resolution_blocks:
            raise ValueError("full_resolution_blocks=False needs a downsampling stage (len(block_out_channels) >= 2)")
        self.encoder = Encoder3D(
            in_channels, latent_channels, block_out_channels, layers_per_block, strides, norm_num_groups, norm_type,
            full_resolution_blocks,
        )
        self.quant_conv = nn.Conv3d(latent_channels, vq_embed_dim, 1)
        if quantizer_type == "ema":
            if dead_code_threshold >= 1.0:  # a config saved when the threshold was an absolute count
                logger.warning(
                    f"dead_code_threshold={dead_code_threshold} is an absolute count from an older config; it is "
                    "now a share in [0, 1) of the mean code count: using 0.05 (inference is unaffected)"
                )
                dead_code_threshold = 0.05
            self.quantizer = EMAVectorQuantizer(
                num_vq_embeddings, vq_embed_dim, ema_decay, commitment_weight, dead_code_threshold
            )
        elif quantizer_type == "fsq":
            if len(fsq_levels) != vq_embed_dim:
                raise ValueError(
                    f"FSQ needs vq_embed_dim == len(fsq_levels), got vq_embed_dim={vq_embed_dim} and "
                    f"fsq_levels={tuple(fsq_levels)} (leave vq_embed_dim out to have it follow the levels)"
                )
            self.quantizer = FiniteScalarQuantizer(fsq_levels)
        else:
            raise ValueError(f"quantizer_type must be 'ema' or 'fsq', got {quantizer_type!r}")
        self.post_quant_conv = nn.Conv3d(vq_embed_dim, latent_channels, 1)
        self.decoder = Decoder3D(
            latent_channels, out_channels, block_out_channels, layers_per_block, strides, norm_num_groups, norm_type,
            full_resolution_blocks,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQGAN3D":
        """A freshly initialised model from a named preset (`tiny`, `ctpa-512`); see `preset_config`."""
        return cls(**cls.preset_config(name, **overrides))

    @staticmethod
    def preset_config(name: str, **overrides) -> dict:
        """The constructor arguments a named preset sets, with `overrides` on top.

        With `quantizer_type="fsq"` and no explicit `vq_embed_dim`, the code dimension follows
        `fsq_levels` (one channel per level); an explicit contradicting pair raises when built.
        """
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        config = {**PRESETS[name], **overrides}
        if config.get("quantizer_type") == "fsq" and "vq_embed_dim" not in overrides:
            config["vq_embed_dim"] = len(config.get("fsq_levels", DEFAULT_FSQ_LEVELS))
        return config

    # ----------------------------------------------------------------------------- shapes

    def latent_shape(self, volume_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """`(D, H, W)` -> `(C, d, h, w)` of `encode`'s output, exactly; errors if not divisible."""
        spatial = tuple(int(s) for s in volume_shape[-3:])
        factor = tuple(self.config.downsample_factor)
        if len(spatial) != 3 or any(s % f for s, f in zip(spatial, factor)):
            raise ValueError(
                f"volume shape {tuple(volume_shape)} is not divisible by the downsampling factor {factor} "
                "(pad it, or use the patch-wise pipeline, which pads)"
            )
        return (self.config.vq_embed_dim, *(s // f for s, f in zip(spatial, factor)))

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        """Shape checks always; the NaN/Inf scan only in eval mode (it waits for the device).

        Training data are checked where they enter (NIfTI reading, `ctpa-vq prepare`), so a
        training step never synchronises the host.
        """
        if x.ndim != 5:
            raise ValueError(f"{what} must be (B, C, D, H, W), got a {x.ndim}D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channel(s), got shape {tuple(x.shape)}")
        if not self.training and not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or Inf values")

    # ----------------------------------------------------------------------------- the contract

    def encode(self, x: torch.Tensor, return_dict: bool = False) -> torch.Tensor | VQEncoderOutput:
        """`(B, 1, D, H, W)` in [-1, 1] -> continuous pre-quantisation latents `(B, C, d, h, w)`.

        A tensor by default (the contract downstream code relies on); `return_dict=True` gives
        diffusers' `VQEncoderOutput` with `.latents`, as `diffusers.VQModel.encode` does.
        """
        self._check_input(x, self.config.in_channels, "input volume")
        self.latent_shape(x.shape)
        latents = self.quant_conv(self.encoder(x))
        return VQEncoderOutput(latents=latents) if return_dict else latents

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerOutput]:
        """Continuous latents -> `(z_q, indices (B, d, h, w), stats)`; updates the EMA codebook in training mode."""
        out = self.quantizer(z)
        return out.z_q, out.indices, out

    def decode(self, z_q: torch.Tensor, return_dict: bool = False) -> torch.Tensor | DecoderOutput:
        """Quantised latents `(B, C, d, h, w)` -> volume `(B, 1, D, H, W)` in [-1, 1] (unclipped).

        `return_dict=True` gives diffusers' `DecoderOutput` with `.sample`, as `VQModel.decode` does.
        """
        self._check_input(z_q, self.config.vq_embed_dim, "latents")
        sample = self.decoder(self.post_quant_conv(z_q))
        return DecoderOutput(sample=sample) if return_dict else sample

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices `(B, d, h, w)` -> volume `(B, 1, D, H, W)`."""
        if indices.ndim != 4:
            raise ValueError(f"indices must be (B, d, h, w), got shape {tuple(indices.shape)}")
        codes = self.quantizer.indices_to_codes(indices.long())
        return self.decode(codes.to(self.post_quant_conv.weight.dtype))

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> VQGAN3DOutput | tuple:
        """Encode, quantise, decode `(B, 1, D, H, W)`."""
        z_q, indices, stats = self.quantize(self.encode(sample))
        reconstruction = self.decode(z_q)
        output = VQGAN3DOutput(
            sample=reconstruction,
            commitment_loss=stats.commitment_loss,
            perplexity=stats.perplexity,
            codebook_usage=stats.codebook_usage,
            indices=indices,
        )
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------- latent scaling

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.config.latents_mean, self.config.latents_std
        if mean is None or std is None:
            raise ValueError("latents_mean/latents_std are not set in this model's config; run `ctpa-vq latent-stats`")
        shape = (1, -1, 1, 1, 1)
        return (
            torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape),
            torch.tensor(std, dtype=z.dtype, device=z.device).view(shape),
        )

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Standardise latents `(B, C, d, h, w)` with the stored per-channel statistics."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `scale_latents`."""
        mean, std = self._latent_stats(z)
        return z * std + mean
