"""`CTPAReconstructionPipeline`: whole CT volume -> latent grid -> whole CT volume, patch-wise."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import nibabel as nib
import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..data.nifti import ct_from_image
from ..data.volume_io import load_volume
from ..hub.model_source import ModelSource, local_model, resolve_model
from ..models import VQGAN3D
from ..models.input_spec import check_volume
from ..models.intensity import hu_to_unit, unit_to_hu
from ..patching import BlendMode, PatchGrid, PatchStitcher, StitchMode, plan_grid

VolumeInput = Union[np.ndarray, torch.Tensor, str, os.PathLike, nib.Nifti1Image]
"""A (D, H, W) HU array/tensor in canonical orientation, a volume path (NIfTI, NRRD or MetaImage
file, DICOM series folder: `ctpa_vq.data.volume_io.load_volume`), or a nibabel image."""

DEFAULT_MAX_PATCH_VOXELS = 128 * 256 * 256
"""Memory budget of a planned patch: the voxels of the seeds' patch, which the `ctpa-512` model
runs in bf16 on one 80 GB GPU and the `tiny` model in about 2 GB on a CPU."""
SEAM_FREE_LATENT_OVERLAP = 4
"""Latent voxels neighbouring planned patches share (16 pixels at 4x downsampling): the smallest
overlap at which a trained `tiny` model's patch-wise output shows no seam (benchmarks/planner.py)."""
KEEP_WHOLE_AXES = (1, 0)
"""Among equally cheap planned grids, cut W (left-right) first, D next, H (anterior-posterior)
last: a body's left and right halves hold alike tissue, and so give a patch GroupNorm statistics
like the whole volume's, while a front or back half is mostly air or table. On the real lung1 CT
(48x512x512, trained `tiny`) two 48x512x264 halves score 27.19 dB, two 48x264x512 halves 25.97
(benchmarks/planner.py)."""
PLANNED = "planned"
"""`patch_size` that asks for the planned grid even when the model stores an inference patch."""
ROUTES = ("per-patch", "latent-grid")
_SLAB = 16  # slices converted HU <-> [-1, 1] at a time, to bound temporaries


@dataclass
class CTPAReconstructionOutput(BaseOutput):
    """Output of `CTPAReconstructionPipeline.__call__`.

    Attributes:
        reconstruction: `(D, H, W)` float32 HU on the CPU (numpy, or torch for `output_type="pt"`),
            in the input's canonical orientation and shape.
        latents: stitched continuous latents `(1, C, d, h, w)` (float32, CPU), if requested.
        indices: code indices `(1, d, h, w)` (int64, CPU) of the quantised latents, if requested.
    """

    reconstruction: np.ndarray | torch.Tensor
    latents: torch.Tensor | None = None
    indices: torch.Tensor | None = None


def _inference(method):
    """Run a pipeline method under `torch.inference_mode` with the model in eval mode (the EMA
    codebook frozen), and give the caller's train/eval mode back afterwards."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        was_training = self.vqgan.training
        self.vqgan.eval()
        try:
            with torch.inference_mode():
                return method(self, *args, **kwargs)
        finally:
            self.vqgan.train(was_training)

    return run


class CTPAReconstructionPipeline(DiffusionPipeline):
    r"""Reconstruct whole CT volumes with a `VQGAN3D` from overlapping, blended patches.

    The patch grid (`patch_grid`) uses the patch the model was trained on (its `inference_patch_size`,
    25% overlap) or, for a model without one, is planned per volume: the fewest voxels run within a
    memory budget per patch, neighbours sharing 16 voxels. Patches align to the downsampling factor.

    Two routes, both running each patch through the encoder once and the decoder once:

    - `"per-patch"` (default): each patch is encoded, quantised and decoded on its own, decoded
      patches are blended in pixels, and the latent grid is stitched from the same encodings,
      each latent voxel from the patch whose centre is nearest (`latent_blend="nearest"`), so
      its codes are those the reconstruction used. The decoder was trained on patches with
      their own latents; mixing codes from neighbouring patches costs it 0.1 dB (trained
      `tiny`, 27 patches of 64^3 on 133x160x160), which this route does not pay.
    - `"latent-grid"`: `encode_volume`, `quantize_latents`, `decode_latents`: the path a DDPM's
      samples take, so its PSNR is what a DDPM trained on these latents gets back.

    Patch sizes larger than the volume are shrunk to the volume (rounded up to the
    downsampling factor): the model is fully convolutional, so this only saves the work of
    reconstructing padding. Inference runs under `torch.inference_mode` on the model's
    device and dtype; the volume, the latent grid and the output stay on the CPU in float32,
    so GPU memory holds one batch of patches.

    Args:
        vqgan: the autoencoder; its `config.hu_window` maps HU to its [-1, 1] range.
    """

    def __init__(self, vqgan: VQGAN3D):
        super().__init__()
        self.register_modules(vqgan=vqgan)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "CTPAReconstructionPipeline":
        """Load from a local folder or a Hub repo id.

        diffusers reads our component library (`ctpa_vq...`) in a Hub repo's `model_index.json`
        as remote code and refuses it, so a repo id is first fetched with `snapshot_download`
        (JSON and safetensors files only) and then loaded as a local folder.
        """
        if not Path(pretrained_model_name_or_path).is_dir():
            from huggingface_hub import snapshot_download

            hub_args = ("revision", "token", "cache_dir", "local_files_only")
            pretrained_model_name_or_path = snapshot_download(
                str(pretrained_model_name_or_path),
                allow_patterns=["*.json", "*.safetensors"],
                **{k: kwargs.pop(k) for k in hub_args if k in kwargs},
            )
        source = local_model(pretrained_model_name_or_path)
        if source.bundles_code:  # the layout for diffusers alone (`ctpa_vq.hub.remote_code`): use this package's classes
            return cls(vqgan=VQGAN3D.from_pretrained(source.location, subfolder=source.subfolder, **kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def window(self) -> tuple[float, float]:
        low, high = self.vqgan.config.hu_window
        return float(low), float(high)

    @property
    def factor(self) -> tuple[int, int, int]:
        return tuple(int(f) for f in self.vqgan.config.downsample_factor)

    # ----------------------------------------------------------------------------- inputs

    @staticmethod
    def read_volume(volume: VolumeInput) -> np.ndarray | torch.Tensor:
        """The `(D, H, W)` HU data of any accepted input; errors name the input and the problem."""
        return CTPAReconstructionPipeline._read(volume)[0]

    @staticmethod
    def _read(volume: VolumeInput) -> tuple[np.ndarray | torch.Tensor, tuple[float, ...] | None, str | None]:
        """`(HU (D, H, W), spacing in mm, name)`; a file or image gives its own spacing and name, an array neither."""
        if isinstance(volume, (str, os.PathLike)):
            ct = load_volume(volume)
            return ct.hu, ct.spacing, ct.name
        if isinstance(volume, nib.spatialimages.SpatialImage):
            ct = ct_from_image(volume, name=str(volume.get_filename() or "nibabel image"))
            return ct.hu, ct.spacing, ct.name
        if not isinstance(volume, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"volume must be a (D, H, W) array/tensor, a volume path or a nibabel image, got {type(volume)}"
            )
        if volume.ndim != 3:
            raise ValueError(f"volume must be 3D (D, H, W), got shape {tuple(volume.shape)}")
        finite = np.isfinite(volume).all() if isinstance(volume, np.ndarray) else torch.isfinite(volume).all()
        if not finite:
            raise ValueError("volume holds NaN or Inf voxels")
        return volume, None, None

    def check_input(
        self, hu: np.ndarray | torch.Tensor, spacing: Sequence[float] | None = None, name: str = "volume"
    ) -> list[str]:
        """Compare a volume (HU `(D, H, W)`, spacing in mm if known) with the model's `training_data`
        record: one `ctpa_vq.models.input_spec.InputSpecWarning` naming `name` and what lies outside it
        (spacing, clipped fraction); never raises. Silent for a model without the record."""
        return check_volume(getattr(self.vqgan.config, "training_data", None), name, hu, spacing, self.window)

    def _read_checked(
        self, volume: VolumeInput, spacing: Sequence[float] | None, name: str | None
    ) -> np.ndarray | torch.Tensor:
        """`read_volume`, then `check_input` with the file's own spacing and name (else those given)."""
        hu, own_spacing, own_name = self._read(volume)
        self.check_input(hu, own_spacing or spacing, name or own_name or "volume")
        return hu

    def _to_unit(self, hu: np.ndarray | torch.Tensor) -> torch.Tensor:
        """HU `(D, H, W)` -> float32 `(1, D, H, W)` CPU tensor in [-1, 1], slab by slab."""
        unit = torch.empty((1, *hu.shape), dtype=torch.float32)
        for start in range(0, hu.shape[0], _SLAB):  # numpy stays numpy: read-only memmaps are fine
            unit[0, start : start + _SLAB] = torch.as_tensor(hu_to_unit(hu[start : start + _SLAB], self.window))
        return unit

    def _to_hu(self, unit: torch.Tensor) -> torch.Tensor:
        """In place: `(..., D, H, W)` in [-1, 1] -> HU (clipped to the window), slab by slab along D."""
        for slab in unit.split(_SLAB, dim=-3):
            slab.copy_(unit_to_hu(slab, self.window))
        return unit

    def patch_grid(
        self,
        volume_shape: Sequence[int],
        patch_size: Sequence[int] | str | None = None,
        overlap: float | int | Sequence[float | int] | None = None,
        max_patch_voxels: int | None = None,
    ) -> PatchGrid:
        """The pixel-space patch grid for a `(D, H, W)` volume, aligned to the downsampling factor.

        Default (`patch_size=None`): the model's `inference_patch_size` (the patch it was trained on,
        for a model without GroupNorm) when it holds at most `max_patch_voxels`, else planned.
        Planned (`patch_size="planned"`, or the default of a model without a stored patch): the grid
        that runs the fewest voxels with at most `max_patch_voxels` (default
        `DEFAULT_MAX_PATCH_VOXELS`) per patch and `overlap` voxels (default
        `SEAM_FREE_LATENT_OVERLAP` latent voxels) shared by neighbours, cut along W before D before H
        when grids cost the same (`KEEP_WHOLE_AXES`); see `ctpa_vq.patching.plan_grid`. Explicit (or
        stored): `patch_size` with `overlap` (fraction or voxels, default 0.25), patches shrunk to
        the volume (rounded up to the factor).
        """
        shape = _three(volume_shape, "volume_shape")
        budget = DEFAULT_MAX_PATCH_VOXELS if max_patch_voxels is None else int(max_patch_voxels)
        if patch_size is None:
            stored = self.vqgan.config.inference_patch_size
            patch_size = PLANNED if stored is None or math.prod(stored) > budget else stored
        if isinstance(patch_size, str):
            if patch_size != PLANNED:
                raise ValueError(f"patch_size must be (D, H, W) voxels or {PLANNED!r}, got {patch_size!r}")
            if overlap is None:
                overlap = [SEAM_FREE_LATENT_OVERLAP * f for f in self.factor]
            if any(isinstance(o, float) for o in _three(overlap, "overlap")):
                raise ValueError(f"a planned grid takes its overlap in voxels (an int), got {overlap}")
            return plan_grid(shape, budget, overlap, align=self.factor, keep_whole=KEEP_WHOLE_AXES)
        patch = tuple(
            min(int(p), -(-int(n) // f) * f) for p, n, f in zip(_three(patch_size, "patch_size"), shape, self.factor)
        )
        return PatchGrid(shape, patch, 0.25 if overlap is None else overlap, align=self.factor)

    # ----------------------------------------------------------------------------- the three stages

    @_inference
    def encode_volume(
        self,
        volume: VolumeInput,
        patch_size: Sequence[int] | str | None = None,
        overlap: float | int | Sequence[float | int] | None = None,
        latent_blend: StitchMode = "nearest",
        batch_size: int = 1,
        max_patch_voxels: int | None = None,
        spacing: Sequence[float] | None = None,
        name: str | None = None,
    ) -> torch.Tensor:
        """HU volume `(D, H, W)` -> continuous latent grid `(1, C, ceil(D/f), ceil(H/f), ceil(W/f))`.

        The grid is `patch_grid(shape, patch_size, overlap, max_patch_voxels)`. With the default
        `latent_blend="nearest"` each latent voxel is the latent of the patch whose centre is nearest,
        so the quantised grid holds the very codes per-patch inference uses (quantisation is per
        vector); a blend mode averages overlapping latents instead. These are the unscaled
        latents of `VQGAN3D.encode`; a DDPM standardises them with `vqgan.scale_latents`.
        `spacing` (mm) and `name` of an array input are what `check_input` reports on.
        """
        unit = self._to_unit(self._read_checked(volume, spacing, name))
        grid = self.patch_grid(unit.shape[1:], patch_size, overlap, max_patch_voxels)
        return self._encode_unit(unit, grid, latent_blend, batch_size)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches `(B, 1, D, H, W)` -> (decoded patches, their continuous latents)."""
        latents = self.vqgan.encode(x)
        return self.vqgan.decode(self.vqgan.quantize(latents)[0]), latents

    def _forward_patches(
        self, unit: torch.Tensor, grid: PatchGrid, blend: BlendMode, latent_blend: StitchMode, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch encode -> quantise -> decode of `unit` `(1, D, H, W)`: the blended volume
        `(1, D, H, W)` and the latent grid `(1, C, d, h, w)`, both float32 on the CPU."""
        latent_stitcher = PatchStitcher(grid, latent_blend, output_scale=[1 / f for f in self.factor])
        unit, latents = self._stitch(
            PatchStitcher(grid, blend), self._forward, unit, "reconstruct patches", batch_size, side=latent_stitcher
        )
        return unit, latents[None]

    def _stitch(self, stitcher: PatchStitcher, fn, volume: torch.Tensor, description: str, batch_size: int, **kwargs):
        """Run `fn` over `stitcher`'s patches of `volume` on the model's device and dtype, stitched
        on the CPU, with a progress bar."""
        with self.progress_bar(total=len(stitcher.grid)) as bar:
            bar.set_description(description)
            return stitcher(
                fn,
                volume,
                batch_size=batch_size,
                device=self.vqgan.device,
                dtype=self.vqgan.dtype,
                out_device="cpu",
                progress=bar,
                **kwargs,
            )

    def _encode_unit(self, unit: torch.Tensor, grid: PatchGrid, blend: StitchMode, batch_size: int) -> torch.Tensor:
        stitcher = PatchStitcher(grid, blend, output_scale=[1 / f for f in self.factor])
        return self._stitch(stitcher, self.vqgan.encode, unit, "encode patches", batch_size)[None]

    @_inference
    def quantize_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent grid `(1, C, d, h, w)` -> `(z_q (1, C, d, h, w) float32, indices (1, d, h, w))` on the CPU.

        The quantizer searches nearest codes in chunks of latent vectors itself (bounded memory
        whatever the grid size), so the whole grid goes in one call.
        """
        _check_latents(latents, self.vqgan.config.vq_embed_dim)
        z_q, indices, _ = self.vqgan.quantize(latents.to(self.vqgan.device, torch.float32))
        return z_q.float().cpu(), indices.cpu()

    @_inference
    def decode_latents(
        self,
        latents: torch.Tensor,
        patch_size: Sequence[int] | str | None = None,
        overlap: float | int | Sequence[float | int] | None = None,
        blend: BlendMode = "linear",
        batch_size: int = 1,
        quantize: bool = True,
        volume_shape: Sequence[int] | None = None,
        output_type: str = "np",
        max_patch_voxels: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Latent grid `(1, C, d, h, w)` -> HU volume `(D, H, W)` float32 on the CPU.

        Args:
            latents: unscaled latents (a DDPM's samples go through `vqgan.unscale_latents` first).
            patch_size, overlap, max_patch_voxels: the *pixel* grid, as for `encode_volume`
                (`patch_grid`'s default); latent patches are `patch_size / f`.
            quantize: snap to the codebook first (set False for already quantised latents).
            volume_shape: crop the result to this `(D, H, W)`; default `(d*f, h*f, w*f)`.
            output_type: `"np"` or `"pt"`.
        """
        _check_latents(latents, self.vqgan.config.vq_embed_dim)
        if quantize:
            latents = self.quantize_latents(latents)[0]
        pixel_shape = [n * f for n, f in zip(latents.shape[2:], self.factor)]
        pixel_grid = self.patch_grid(pixel_shape, patch_size, overlap, max_patch_voxels)
        return self._decode(latents, pixel_grid, blend, batch_size, volume_shape, output_type)

    def _decode(
        self,
        latents: torch.Tensor,
        pixel_grid: PatchGrid,
        blend: BlendMode,
        batch_size: int,
        volume_shape: Sequence[int] | None,
        output_type: str,
    ) -> np.ndarray | torch.Tensor:
        latent_shape = tuple(latents.shape[2:])
        latent_patch = [p // f for p, f in zip(pixel_grid.patch_size, self.factor)]
        latent_overlap = [(p - s) // f for p, s, f in zip(pixel_grid.patch_size, pixel_grid.stride, self.factor)]
        grid = PatchGrid(latent_shape, latent_patch, latent_overlap)
        if volume_shape is not None:
            volume_shape = _three(volume_shape, "volume_shape")
            if any(not (n * f - f < v <= n * f) for v, n, f in zip(volume_shape, latent_shape, self.factor)):
                raise ValueError(f"volume shape {volume_shape} does not fit latents of shape {latent_shape}")
        stitcher = PatchStitcher(grid, blend, output_scale=self.factor, output_shape=volume_shape)
        unit = self._stitch(stitcher, self.vqgan.decode, latents[0], "decode patches", batch_size)
        hu = self._to_hu(unit[0])
        return hu.numpy() if output_type == "np" else hu

    @_inference
    def __call__(
        self,
        volume: VolumeInput,
        patch_size: Sequence[int] | str | None = None,
        overlap: float | int | Sequence[float | int] | None = None,
        blend: BlendMode = "linear",
        batch_size: int = 1,
        return_latents: bool = False,
        output_type: str = "np",
        return_dict: bool = True,
        max_patch_voxels: int | None = None,
        latent_blend: StitchMode = "nearest",
        route: str = "per-patch",
        spacing: Sequence[float] | None = None,
        name: str | None = None,
    ) -> CTPAReconstructionOutput | tuple:
        """Reconstruct a whole HU volume patch-wise.

        Args:
            volume: `(D, H, W)` HU (numpy/torch, canonical orientation), a volume path (see
                `VolumeInput`) or a nibabel image.
            patch_size: `(D, H, W)` patch in voxels or `"planned"`; default None: the model's
                `inference_patch_size`, else planned (`patch_grid`).
            overlap: per-axis fraction in [0, 1) or voxel count; default: 25% of an explicit or
                stored patch, `SEAM_FREE_LATENT_OVERLAP` latent voxels for a planned grid (voxels only).
            blend: how decoded patches blend in pixels: `"linear"` (default: a ramp across the
                overlap, seam-free from 16 voxels; gaussian needs 24), `"gaussian"` or `"constant"`.
            batch_size: patches per model call.
            return_latents: also return the latent grid and its code indices.
            output_type: `"np"` or `"pt"` for the reconstruction.
            max_patch_voxels: memory budget per patch (default `DEFAULT_MAX_PATCH_VOXELS`).
            latent_blend: how encoded patches combine into the latent grid, see `encode_volume`.
            route: `"per-patch"` (default): each patch is encoded, quantised and decoded on its
                own and the decoded patches blended (the latent grid is kept on the way, at no
                extra model cost); `"latent-grid"`: `encode_volume`, then `decode_latents` of the
                quantised grid, the path a DDPM's samples take (same cost; on a trained `tiny`
                model 0.1 dB lower with 64^3 patches, equal when one patch covers the volume).
            spacing, name: an array's voxel spacing in mm (D, H, W) and a name, for `check_input`'s
                warning when the volume lies outside the model's training data (a file or nibabel
                image gives its own); the volume is not resampled (see `ctpa_vq.pipelines.spacing`).

        Returns:
            `CTPAReconstructionOutput` (or a tuple `(reconstruction, latents, indices)`).
        """
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        hu = self._read_checked(volume, spacing, name)
        grid = self.patch_grid(hu.shape, patch_size, overlap, max_patch_voxels)
        if route == "latent-grid":
            latents = self._encode_unit(self._to_unit(hu), grid, latent_blend, batch_size)
            z_q, indices = self.quantize_latents(latents)
            reconstruction = self._decode(z_q, grid, blend, batch_size, hu.shape, output_type)
        else:
            unit, latents = self._forward_patches(self._to_unit(hu), grid, blend, latent_blend, batch_size)
            hu_out = self._to_hu(unit[0])
            reconstruction = hu_out.numpy() if output_type == "np" else hu_out
            indices = self.quantize_latents(latents)[1] if return_latents else None
        output = CTPAReconstructionOutput(
            reconstruction=reconstruction,
            latents=latents if return_latents else None,
            indices=indices if return_latents else None,
        )
        return output if return_dict else output.to_tuple()


def load_reconstruction_pipeline(
    model: str | os.PathLike | ModelSource, torch_dtype: torch.dtype | None = None
) -> CTPAReconstructionPipeline:
    """A pipeline from a saved pipeline or a bare `VQGAN3D`, as a local folder or a Hub repo id
    (`org/name[@revision]`, `ctpa_vq.hub.model_source.resolve_model`), or from an already resolved `ModelSource`."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if source.revision is not None:
        kwargs["revision"] = source.revision
    if source.is_pipeline:
        return CTPAReconstructionPipeline.from_pretrained(source.location, **kwargs)
    return CTPAReconstructionPipeline(VQGAN3D.from_pretrained(source.location, **kwargs))


def _three(value, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 entries (D, H, W), got {value}")
    return values


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != channels:
        raise ValueError(f"latents must be (1, {channels}, d, h, w), got shape {tuple(latents.shape)}")
