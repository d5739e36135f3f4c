"""The perceptual distance: an LPIPS-style VGG16 distance on 2D slices, and loading its weights.

The VGG16 conv stack is defined here (no torchvision) with parameter names that match
torchvision's ``features.N.weight`` and LPIPS's ``lin{k}.model.1.weight``, so their published
weights load from a safetensors file or Hub repo given by the user. Nothing is downloaded unless
a repo id is given, and pickled checkpoints are never read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsNotFoundError(FileNotFoundError):
    """The perceptual backbone's weights are neither a local file/directory nor a fetchable repo."""


class PerceptualWeightsError(ValueError):
    """A weights file that is not safetensors or does not hold a VGG16 backbone."""


# torchvision's VGG16 ``features`` up to relu5_3 (module indices 0..29); "M" is a 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: LPIPS's layers
_TAP_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")  # the lpips package's names


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, item, kernel_size=3, padding=1), nn.ReLU()]
            c_in = item
    return nn.Sequential(*layers)


class _ChannelWeights(nn.Module):
    """Per-channel weights stored like LPIPS's NetLinLayer, a 1x1 conv (keys ``model.1.weight``).

    Index 0 stands where LPIPS has a dropout, which does nothing in a frozen network. The
    default weights are uniform (``1 / channels``): the mean squared difference over channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        nn.init.constant_(self.model[1].weight, 1.0 / channels)

    def weighted_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, H, W)``, in float32 whatever autocast is on."""
        weight = self.model[1].weight.float().view(1, -1, 1, 1)  # (1, C, 1, 1); no autocast'd matmul
        return (x.float() * weight).sum(dim=1)


class PerceptualLoss2D(nn.Module):
    """LPIPS-style distance between ``(N, 1, H, W)`` slices in [-1, 1]; frozen, always in eval.

    Slices are repeated to 3 channels and ImageNet-normalised, passed through VGG16 up to
    relu5_3; at each of the five LPIPS layers the activations are unit-normalised over channels,
    their squared difference is weighted per channel (LPIPS heads or uniform), averaged over
    space, and the five terms are summed. Returns the mean over the ``N`` slices.

    ``PerceptualLoss2D()`` is randomly initialised; use :meth:`from_pretrained` for real weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        for k, channels in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _ChannelWeights(channels))
        # ImageNet normalisation written for inputs in [-1, 1]: ((x + 1) / 2 - mean) / std.
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("shift", (2 * mean - 1).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", (2 * std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss2D:
        """Stays in eval mode whatever is asked: the network is a fixed measuring instrument."""
        return super().train(False)

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
        return taps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``input``, ``target`` ``(N, 1, H, W)`` in [-1, 1], ``H, W >= 16`` -> scalar distance."""
        if input.shape != target.shape or input.ndim != 4 or input.shape[1] != 1:
            raise ValueError(
                "perceptual loss expects two (N, 1, H, W) slice batches of one shape, got "
                f"{tuple(input.shape)} and {tuple(target.shape)}"
            )
        if min(input.shape[-2:]) < 16:
            raise ValueError(f"perceptual loss needs slices of at least 16x16, got {tuple(input.shape)}")
        n = input.shape[0]
        taps = self._activations(torch.cat([input, target]))
        distance = input.new_zeros(n, dtype=torch.float32)
        for k, tap in enumerate(taps):
            tap = tap.float()
            # rsqrt(sum + eps) rather than LPIPS's x / (norm + eps): finite gradients where every
            # channel is zero (uniform air in CT gives such regions).
            tap = tap * torch.rsqrt(tap.square().sum(dim=1, keepdim=True) + 1e-10)
            squared = (tap[:n] - tap[n:]).square()
            distance = distance + getattr(self, f"lin{k}").weighted_sum(squared).mean(dim=(1, 2))
        return distance.mean()

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        filename: str = "model.safetensors",
        revision: str | None = None,
    ) -> PerceptualLoss2D:
        """Load VGG16 (+ optional LPIPS head) weights from a safetensors file, directory or repo.

        A local file is used as is; a local directory is joined with ``filename``; anything else
        that is a valid Hub repo id is fetched with ``hf_hub_download(repo, filename)``. Keys are
        torchvision's ``features.N.{weight,bias}`` (the ``lpips`` package's ``net.sliceK.N.*`` are
        accepted too) and optionally ``lin{k}.model.1.weight``; other keys (classifier heads) are
        ignored. Returns the loss on the CPU, frozen.
        """
        file = _resolve_weights_file(str(path_or_repo_id), filename, revision)
        model = cls()
        model.load_state_dict(_backbone_state(file, model.state_dict()), strict=False)
        logger.info("perceptual loss: VGG16 weights from %s", file)
        return model


def _resolve_weights_file(path_or_repo_id: str, filename: str, revision: str | None) -> Path:
    local = Path(path_or_repo_id).expanduser()
    candidate = local / filename if local.is_dir() else local
    if candidate.is_file():
        return candidate
    if local.exists() or local.suffix == ".safetensors" or not _is_repo_id(path_or_repo_id):
        raise PerceptualWeightsNotFoundError(f"{candidate}: perceptual backbone weights file not found")
    try:
        return Path(hf_hub_download(path_or_repo_id, filename, revision=revision))
    except (EntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise PerceptualWeightsNotFoundError(
            f"{path_or_repo_id}: perceptual backbone weights are not a local file or directory, "
            f"and {filename!r} could not be fetched from that Hub repo ({type(error).__name__}: {error})"
        ) from error


def _is_repo_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _backbone_state(file: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``file`` the perceptual network uses, checked against ``expected`` shapes."""
    try:
        raw = load_file(file)
    except (SafetensorError, OSError) as error:
        raise PerceptualWeightsError(f"{file}: not a readable safetensors file ({error})") from error
    state = {}
    for key, value in raw.items():
        match = _LPIPS_SLICE_KEY.match(key)
        state[f"features.{match[1]}.{match[2]}" if match else key] = value
    state = {key: value for key, value in state.items() if key in expected}

    backbone_keys = [key for key in expected if key.startswith("features.")]
    head_keys = [key for key in expected if key.startswith("lin")]
    missing = [key for key in backbone_keys if key not in state]
    heads_found = [key for key in head_keys if key in state]
    if heads_found and len(heads_found) != len(head_keys):
        missing += [key for key in head_keys if key not in state]
    if missing:
        raise PerceptualWeightsError(
            f"{file}: not VGG16 perceptual weights; missing {len(missing)} keys, e.g. "
            f"{missing[:4]} (expected torchvision's 'features.N.weight' names"
            f"{', plus all five LPIPS heads' if heads_found else ''})"
        )
    wrong = [
        f"{key} {tuple(value.shape)} != {tuple(expected[key].shape)}"
        for key, value in state.items()
        if value.shape != expected[key].shape
    ]
    if wrong:
        raise PerceptualWeightsError(f"{file}: tensors of the wrong shape: {wrong[:4]}")
    logger.info(
        "perceptual loss: %s channel weights", "LPIPS" if heads_found else "uniform (no LPIPS heads in file)"
    )
    return state


def build_perceptual_loss(
    weights: str | Path | None, filename: str = "model.safetensors"
) -> PerceptualLoss2D | None:
    """The perceptual loss from ``weights`` (file, directory or Hub repo id), or None when unset."""
    if weights is None or str(weights) == "":
        logger.warning(
            "perceptual loss off: no backbone weights given (set gan.perceptual_weights=...)"
        )
        return None
    return PerceptualLoss2D.from_pretrained(weights, filename=filename)
