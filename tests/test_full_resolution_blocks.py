"""`full_resolution_blocks=False`: no convolution runs at the input's resolution except the
strided input conv; the decoder ends in a sub-pixel convolution. Old configs keep the blocks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ctpa_vq import VQGAN3D
from ctpa_vq.models.blocks import SubpixelConv3d


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    for parameter in module.parameters():
        parameter.data.normal_()


def test_subpixel_upsampling_puts_channel_block_i_j_k_at_offset_i_j_k():
    """Channel ``c * sD*sH*sW + (i*sH + j)*sW + k`` of the coarse conv lands at fine voxel
    ``(d*sD + i, h*sH + j, w*sW + k)`` of output channel ``c``: written out voxel by voxel."""
    scale = (2, 3, 1)
    layer = SubpixelConv3d(3, 2, scale)
    _randomise(layer)
    x = torch.randn(2, 3, 2, 3, 4)
    coarse = F.conv3d(x, layer.weight, layer.bias, padding=1)
    out = layer(x)
    assert out.shape == (2, 2, 4, 9, 4)
    expected = torch.empty_like(out)
    for c in range(2):
        for i in range(2):
            for j in range(3):
                expected[:, c, i::2, j::3, :] = coarse[:, c * 6 + i * 3 + j]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_subpixel_upsampling_starts_as_nearest_neighbour_of_one_conv():
    """ICNR: at initialisation every sub-position has the same kernel, so the output is the
    nearest-neighbour upsampling of one ``out_channels`` convolution."""
    torch.manual_seed(0)
    layer = SubpixelConv3d(4, 1, (2, 2, 2))
    x = torch.randn(1, 4, 3, 3, 3)
    one_conv = F.conv3d(x, layer.weight[:1], layer.bias[:1], padding=1)
    nearest = one_conv.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    torch.testing.assert_close(layer(x), nearest)


def _conv_grids(model: VQGAN3D, volume: tuple[int, int, int]) -> tuple[torch.Tensor, list[tuple]]:
    """The model's output on a random ``volume``, and every Conv3d run on the way as
    ``(name, input (D, H, W), output (D, H, W))``."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: seen.append((name, i[0].shape[2:], o.shape[2:])))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv3d)
    ]
    try:
        out = model(torch.rand(1, 1, *volume) * 2 - 1).sample
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen


@pytest.mark.parametrize("factor", [(4, 4, 4), (2, 4, 4)])
def test_without_full_resolution_blocks_only_the_input_conv_sees_full_resolution(factor):
    """Every Conv3d's input is coarser than the volume except the input conv's, and the only output
    at full resolution is the sub-pixel conv's, rearranged from its coarse channels."""
    model = VQGAN3D.from_preset("tiny", downsample_factor=factor, full_resolution_blocks=False)
    volume = (8, 16, 16)
    out, seen = _conv_grids(model, volume)
    assert out.shape == (1, 1, *volume)
    full = torch.Size(volume)
    assert [name for name, i, o in seen if i == full] == ["encoder.conv_in"]
    assert [name for name, i, o in seen if o == full] == ["decoder.conv_out"]
    assert len(seen) == sum(isinstance(m, torch.nn.Conv3d) for m in model.modules())


def test_with_full_resolution_blocks_resblocks_run_at_full_resolution():
    """The contrast to the test above: the older layout convolves at full resolution in ResBlocks."""
    model = VQGAN3D.from_preset("tiny", full_resolution_blocks=True)
    volume = (8, 16, 16)
    _, seen = _conv_grids(model, volume)
    assert sum(o == torch.Size(volume) for _, _, o in seen) >= 5


def test_presets_have_no_full_resolution_blocks_and_the_option_round_trips(tmp_path):
    for preset in ("tiny", "ctpa-512"):
        assert VQGAN3D.from_preset(preset).config.full_resolution_blocks is False
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny").eval()
    model.save_pretrained(tmp_path)
    loaded = VQGAN3D.from_pretrained(tmp_path).eval()
    assert loaded.config.full_resolution_blocks is False
    x = torch.rand(1, 1, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, model(x).sample)


def test_a_config_saved_before_the_option_loads_with_full_resolution_blocks(tmp_path):
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny", full_resolution_blocks=True).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["full_resolution_blocks"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = VQGAN3D.from_pretrained(tmp_path).eval()
    assert loaded.config.full_resolution_blocks is True
    x = torch.rand(1, 1, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, model(x).sample)


def test_no_full_resolution_blocks_without_a_downsampling_stage_raises():
    with pytest.raises(ValueError, match="needs a downsampling stage"):
        VQGAN3D(block_out_channels=(8,), downsample_factor=(1, 1, 1), full_resolution_blocks=False)
