"""VQGAN3D: the downstream API, save/load, codebook persistence, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ctpa_vq import VQGAN3D


def _plain(config) -> dict:
    """A config as JSON sees it (tuples become lists), without diffusers' private keys."""
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return json.loads(json.dumps(public))


def _volume(batch: int = 2, shape=(16, 32, 32), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *shape, generator=g) * 2 - 1


@pytest.fixture(params=["ema", "fsq"])
def trained_model(request) -> VQGAN3D:
    """A tiny model whose codebook has seen data (EMA updates), then in eval mode."""
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny", quantizer_type=request.param)
    model.train()
    for step in range(3):
        model(_volume(seed=step))
    return model.eval()


def test_forward_shapes_and_stats(trained_model):
    x = _volume()
    out = trained_model(x)
    assert out.sample.shape == x.shape
    assert out.indices.shape == (2, 4, 8, 8)
    assert trained_model.latent_shape((16, 32, 32)) == (trained_model.config.vq_embed_dim, 4, 8, 8)
    # this step's code histogram, counted from the indices the step returned
    counts = torch.bincount(out.indices.flatten(), minlength=trained_model.quantizer.num_codes).double()
    probs = counts[counts > 0] / counts.sum()
    assert float(out.perplexity) == pytest.approx(float(torch.exp(-(probs * probs.log()).sum())), rel=1e-4)
    assert float(out.codebook_usage) == pytest.approx(len(probs) / trained_model.quantizer.num_codes)


def test_encode_quantize_decode_equals_forward(trained_model):
    x = _volume(seed=5)
    with torch.no_grad():
        z = trained_model.encode(x)
        z_q, indices, _ = trained_model.quantize(z)
        assert z.shape == (2, *trained_model.latent_shape(x.shape))
        assert torch.equal(trained_model.decode(z_q), trained_model(x).sample)
        assert torch.equal(trained_model.decode_indices(indices), trained_model.decode(z_q))


def test_anisotropic_downsampling():
    model = VQGAN3D.from_preset("tiny", downsample_factor=(2, 4, 4)).eval()
    x = _volume(1, (8, 32, 32))
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape[2:] == (4, 8, 8)
        assert model.decode(model.quantize(z)[0]).shape == x.shape


def test_save_load_round_trip(trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")), "weights must be safetensors only"
    loaded = VQGAN3D.from_pretrained(tmp_path).eval()
    assert _plain(loaded.config) == _plain(trained_model.config)
    assert json.loads((tmp_path / "config.json").read_text())["hu_window"] == [-1024.0, 2048.0]
    x = _volume(seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, trained_model(x).sample)


def test_codebook_survives_loading_in_train_mode(tmp_path):
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny")
    model(_volume())  # initialises the codebook from data and updates it
    saved = model.quantizer.embedding.clone()
    model.save_pretrained(tmp_path)

    loaded = VQGAN3D.from_pretrained(tmp_path)
    assert bool(loaded.quantizer.initialized)
    assert torch.equal(loaded.quantizer.embedding, saved)
    # One more training step from the loaded copy equals one more step of the original:
    # a re-initialised codebook (random data vectors) could not match.
    for m in (model, loaded):
        m.train()
        torch.manual_seed(7)
        with torch.no_grad():
            m(_volume(seed=3))
    assert torch.equal(loaded.quantizer.embedding, model.quantizer.embedding)


def test_untrained_codebook_is_initialised_from_data_once():
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny")
    before = model.quantizer.embedding.clone()
    assert not bool(model.quantizer.initialized)
    model(_volume())
    assert bool(model.quantizer.initialized)
    assert not torch.equal(model.quantizer.embedding, before)


def test_bf16_load(trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path)
    model = VQGAN3D.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    x = _volume(seed=4)
    with torch.no_grad():
        out = model(x.bfloat16())
        reference = trained_model(x)
        # Same codes -> nearly the same volume; bf16 rounding may flip a few borderline codes.
        same_codes = model.decode_indices(reference.indices)
    assert out.sample.dtype == torch.bfloat16
    assert torch.isfinite(out.sample).all()
    assert (out.indices == reference.indices).float().mean() > 0.8
    assert (same_codes.float() - reference.sample).abs().mean() < 0.01


def test_latent_scaling_uses_stored_statistics(tmp_path):
    model = VQGAN3D.from_preset("tiny")
    with pytest.raises(ValueError, match="latent-stats"):
        model.scale_latents(torch.zeros(1, 8, 2, 2, 2))
    model.register_to_config(latents_mean=[float(c) for c in range(8)], latents_std=[2.0] * 8)
    model.save_pretrained(tmp_path)
    loaded = VQGAN3D.from_pretrained(tmp_path)
    z = torch.randn(1, 8, 2, 3, 4)
    scaled = loaded.scale_latents(z)
    assert torch.allclose(scaled[:, 3], (z[:, 3] - 3.0) / 2.0)
    assert torch.allclose(loaded.unscale_latents(scaled), z, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny", quantizer_type="fsq")
    x = _volume(1, (8, 16, 16))

    def input_grad() -> torch.Tensor:
        model.zero_grad()
        model(x).sample.square().mean().backward()
        return model.encoder.conv_in.weight.grad.clone()

    plain = input_grad()
    model.enable_gradient_checkpointing()
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    assert torch.allclose(input_grad(), plain, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(32, 32), "must be \\(B, C, D, H, W\\)"),
        (torch.zeros(1, 2, 16, 32, 32), "1 channel"),
        (torch.zeros(1, 1, 15, 32, 32), "not divisible"),
        (torch.full((1, 1, 16, 32, 32), float("nan")), "NaN"),
    ],
)
def test_bad_input_raises_clear_error(bad, message):
    model = VQGAN3D.from_preset("tiny").eval()
    with pytest.raises(ValueError, match=message):
        model(bad)


def test_bad_config_raises_clear_error():
    with pytest.raises(ValueError, match="powers of 2"):
        VQGAN3D.from_preset("tiny", downsample_factor=(3, 4, 4))
    with pytest.raises(ValueError, match="downsampling stages"):
        VQGAN3D.from_preset("tiny", downsample_factor=(8, 8, 8))
    with pytest.raises(ValueError, match="unknown preset"):
        VQGAN3D.from_preset("huge")


def test_ctpa_512_preset_size():
    model = VQGAN3D.from_preset("ctpa-512")
    params = sum(p.numel() for p in model.parameters())
    assert 30e6 < params < 45e6
    assert model.latent_shape((128, 256, 256)) == (8, 32, 64, 64)


@pytest.mark.parametrize("preset", ["tiny", "ctpa-512"])
def test_fsq_preset_takes_its_code_dimension_from_the_levels(preset):
    model = VQGAN3D.from_preset(preset, quantizer_type="fsq")
    assert model.config.vq_embed_dim == len(model.config.fsq_levels) == model.quantizer.code_dim == 4
    assert model.latent_shape((16, 32, 32)) == (4, 4, 8, 8)
    six = VQGAN3D.from_preset(preset, quantizer_type="fsq", fsq_levels=(8, 8, 8, 5, 5, 5))
    assert six.config.vq_embed_dim == 6 and six.quantizer.num_codes == 64000


def test_fsq_with_a_contradicting_code_dimension_raises():
    with pytest.raises(ValueError, match="vq_embed_dim.*fsq_levels"):
        VQGAN3D.from_preset("tiny", quantizer_type="fsq", vq_embed_dim=8)


def test_fsq_from_a_recipe_override(tmp_path):
    from ctpa_vq.training import load_config

    config = load_config(overrides=["model.preset=tiny", "model.overrides.quantizer_type=fsq"])
    model = VQGAN3D.from_preset(config.model.preset, **config.model.overrides).eval()
    assert model.config.quantizer_type == "fsq"
    model.save_pretrained(tmp_path)
    loaded = VQGAN3D.from_pretrained(tmp_path).eval()
    assert _plain(loaded.config) == _plain(model.config)
    x = _volume(1, (8, 16, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, model(x).sample)


def test_fsq_trains_through_the_loop(tmp_path):
    """`model.overrides.quantizer_type=fsq` trains: the loss falls through the straight-through rounding."""
    import csv

    from pathlib import Path

    from ctpa_vq.training import load_config, train

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    config = load_config(
        demo,
        [
            "model.overrides.quantizer_type=fsq",
            "optimizer.warmup_steps=0",  # the demo's 20 warm-up steps leave 3 steps' loss change to batch noise
            "dataset.phantoms=3",
            "dataset.phantom_shape=[24,48,48]",
            "dataset.patch_size=[16,32,32]",
            "dataset.patches_per_volume=2",
            "training.batch_size=2",
            "training.max_steps=3",
            "training.checkpoint_every=3",
            "training.validate_every=3",
            "training.log_every=1",
            "training.val_patch_size=[16,32,32]",
            f"training.output_dir={tmp_path / 'run'}",
        ],
    )
    result = train(config)
    with (tmp_path / "run" / "metrics.csv").open() as f:
        l1 = [float(row["l1"]) for row in csv.DictReader(f) if row.get("l1")]
    assert len(l1) == 3 and l1[-1] < l1[0]
    loaded = VQGAN3D.from_pretrained(result.final_dir / "vqgan")
    assert loaded.config.quantizer_type == "fsq" and loaded.config.vq_embed_dim == 4


def test_a_model_saved_with_the_old_absolute_threshold_still_loads(tmp_path, caplog):
    """Configs written before the threshold became a share of the mean count hold 1.0."""
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny").eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dead_code_threshold"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        loaded = VQGAN3D.from_pretrained(tmp_path).eval()
    assert loaded.quantizer.dead_code_threshold == 0.05
    assert "dead_code_threshold" in caplog.text
    x = torch.rand(1, 1, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, model(x).sample, rtol=0, atol=0)
