"""VQGAN3D's `norm_type`: old configs load as GroupNorm; without GroupNorm the output does not
depend on the content of the rest of the patch."""

from __future__ import annotations

import json

import pytest
import torch

from ctpa_vq import VQGAN3D


def _autoencode(model: VQGAN3D, x: torch.Tensor) -> torch.Tensor:
    """Encoder then decoder, skipping the quantiser (whose nearest code could flip on tiny changes)."""
    with torch.no_grad():
        return model.decode(model.encode(x))


@pytest.mark.parametrize("norm_type, independent", [("group", False), ("none", True), ("batch", True)])
def test_output_far_from_a_change_depends_on_the_patch_only_with_groupnorm(norm_type, independent):
    """Changing the first 8 voxels along W of a long patch leaves the last 64 untouched unless a
    GroupNorm spreads the change through its statistics over the whole patch (192 voxels away:
    beyond the tiny model's receptive field)."""
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny", norm_type=norm_type).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("residual_scale"):
            parameter.data.fill_(0.5)  # as after training, not the initial 0 that mutes the branch
    x = torch.rand(1, 1, 8, 8, 256) * 2 - 1
    changed = x.clone()
    changed[..., :8] = -1.0
    far = (..., slice(-64, None))
    difference = (_autoencode(model, x)[far] - _autoencode(model, changed)[far]).abs().max().item()
    near = (_autoencode(model, x)[..., :8] - _autoencode(model, changed)[..., :8]).abs().max().item()
    assert near > 0.0  # the change does reach the output
    if independent:
        assert difference == 0.0
    else:
        assert difference > 1e-3 * near


def test_a_config_saved_before_norm_type_loads_as_groupnorm(tmp_path):
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny", norm_type="group").eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["norm_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = VQGAN3D.from_pretrained(tmp_path).eval()
    assert loaded.config.norm_type == "group"
    assert isinstance(loaded.encoder.norm_out, torch.nn.GroupNorm)
    x = torch.rand(1, 1, 8, 16, 16) * 2 - 1
    assert torch.equal(_autoencode(loaded, x), _autoencode(model, x))


def test_presets_default_to_no_normalisation():
    for preset in ("tiny", "ctpa-512"):
        model = VQGAN3D.from_preset(preset)
        assert model.config.norm_type == "none"
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_norm_type_round_trips_and_an_unknown_one_raises(tmp_path):
    model = VQGAN3D.from_preset("tiny", norm_type="none")
    model.save_pretrained(tmp_path)
    loaded = VQGAN3D.from_pretrained(tmp_path)
    assert loaded.config.norm_type == "none"
    assert torch.equal(loaded.encoder.stages[0][0].residual_scale, model.encoder.stages[0][0].residual_scale)
    with pytest.raises(ValueError, match="norm_type must be one of"):
        VQGAN3D.from_preset("tiny", norm_type="layer")
