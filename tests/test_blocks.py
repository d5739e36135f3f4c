"""Decoder upsampling: outputs past CUDA's int32 limit are computed in batch chunks, same result."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ctpa_vq.models import blocks
from ctpa_vq.models.blocks import Upsample3D


def _nearest(x: torch.Tensor, scale: tuple[int, int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling by integer factors: every voxel repeated along each axis."""
    for axis, factor in enumerate(scale, start=2):
        x = x.repeat_interleave(factor, dim=axis)
    return x


def _count_interpolations(monkeypatch) -> list[int]:
    """The output sizes of every ``F.interpolate`` call from now on (a spy around the real one)."""
    calls: list[int] = []
    interpolate = F.interpolate

    def counting_interpolate(*args, **kwargs):
        out = interpolate(*args, **kwargs)
        calls.append(out.numel())
        return out

    monkeypatch.setattr(F, "interpolate", counting_interpolate)
    return calls


def test_upsampling_splits_the_batch_past_the_element_limit_with_the_same_result(monkeypatch):
    """Before torch 2.7 CUDA's ``upsample_nearest3d`` rejects outputs over INT_MAX elements (batch 2
    of 128 channels x 128x256x256 is 2^31). Here the limit is lowered to two samples' output so a
    batch of 5 must be upsampled in chunks of at most 2; values and gradients must not change."""
    torch.manual_seed(0)
    layer = Upsample3D(4, (2, 2, 1))
    x = torch.randn(5, 4, 3, 4, 5, requires_grad=True)
    per_sample = 4 * 6 * 8 * 5
    monkeypatch.setattr(blocks, "MAX_UPSAMPLE_ELEMENTS", 2 * per_sample + 7, raising=False)
    calls = _count_interpolations(monkeypatch)
    split = layer(x)
    assert calls == [2 * per_sample, 2 * per_sample, per_sample]

    expected = layer.conv(_nearest(x, (2, 2, 1)))
    torch.testing.assert_close(split, expected, rtol=0, atol=0)
    (grad_split,) = torch.autograd.grad(split.square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad_split, grad_expected)
    with torch.inference_mode():  # as the pipeline runs it
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_upsampling_under_the_limit_is_one_call(monkeypatch):
    calls = _count_interpolations(monkeypatch)
    Upsample3D(2, (2, 2, 2))(torch.randn(3, 2, 2, 2, 2))
    assert calls == [3 * 2 * 4 * 4 * 4]
