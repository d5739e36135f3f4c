"""Latent statistics: streaming per-channel mean/std, and `ctpa-vq latent-stats` storing them in the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctpa_vq import VQGAN3D
from ctpa_vq.cli import main
from ctpa_vq.data.phantom import write_phantom_dir
from ctpa_vq.latents.stats import LatentStats, RunningChannelStats, write_latent_stats
from ctpa_vq.pipelines import CTPAReconstructionPipeline, load_reconstruction_pipeline


def test_streaming_stats_equal_the_stats_of_everything_at_once():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(b, 3, 2, 4, 5, generator=g) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1, 1)
              + torch.tensor([100.0, -3.0, 0.5]).view(1, 3, 1, 1, 1) for b in (1, 2, 3)]
    running = RunningChannelStats()
    for chunk in chunks:
        running.update(chunk[0] if chunk.shape[0] == 1 else chunk)  # (C, ...) and (B, C, ...) both accepted
    stats = running.result()
    everything = torch.cat(chunks).transpose(0, 1).reshape(3, -1).double()
    assert stats.count == everything.shape[1]
    np.testing.assert_allclose(stats.mean, everything.mean(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats.std, everything.std(dim=1).numpy(), rtol=1e-10)


def test_bad_latents_are_refused():
    running = RunningChannelStats()
    with pytest.raises(ValueError, match="NaN"):
        running.update(torch.full((1, 2, 2, 2, 2), float("nan")))
    running.update(torch.randn(1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        running.update(torch.randn(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="constant"):
        constant = RunningChannelStats()
        constant.update(torch.ones(1, 2, 2, 2, 2))
        constant.result()


def test_written_stats_round_trip_through_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny")
    model.save_pretrained(tmp_path)
    weights_before = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
    stats = LatentStats(mean=[0.1 * c for c in range(8)], std=[1.0 + c for c in range(8)], count=100)
    write_latent_stats(model, stats, tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["latents_std"] == stats.std
    assert (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes() == weights_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    loaded = VQGAN3D.from_pretrained(tmp_path)
    z = torch.randn(1, 8, 2, 2, 2)
    torch.testing.assert_close(loaded.unscale_latents(loaded.scale_latents(z)), z)
    torch.testing.assert_close(loaded.scale_latents(z)[0, 3], (z[0, 3] - 0.3) / 4.0)


def test_cli_latent_stats_standardises_the_latents_of_its_volumes(tmp_path, capsys):
    torch.manual_seed(0)
    pipeline_dir = tmp_path / "pipeline"
    CTPAReconstructionPipeline(vqgan=VQGAN3D.from_preset("tiny")).save_pretrained(pipeline_dir)
    files = write_phantom_dir(tmp_path / "scans", 2, shape=(24, 40, 32), compressed=False)
    inputs_before = [f.read_bytes() for f in files]

    code = main(["latent-stats", "--model", str(pipeline_dir), "--input", str(tmp_path / "scans"),
                 "--patch", "16", "32", "32", "--no-progress"])
    assert code == 0
    assert "channel 7" in capsys.readouterr().out
    assert [f.read_bytes() for f in files] == inputs_before

    pipe = load_reconstruction_pipeline(pipeline_dir)
    assert len(pipe.vqgan.config.latents_mean) == 8
    latents = torch.cat([pipe.encode_volume(f, patch_size=(16, 32, 32)) for f in files], dim=2)
    scaled = pipe.vqgan.scale_latents(latents).transpose(0, 1).reshape(8, -1)
    torch.testing.assert_close(scaled.mean(dim=1), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std(dim=1), torch.ones(8), atol=1e-4, rtol=0)


def test_cli_latent_stats_names_a_missing_input(tmp_path, capsys):
    VQGAN3D.from_preset("tiny").save_pretrained(tmp_path / "model")
    assert main(["latent-stats", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "nope.nii.gz")]) == 2
    assert "nope.nii.gz" in capsys.readouterr().err


def test_cli_latent_stats_finds_the_volumes_prepare_finds(tmp_path, capsys):
    """A NIfTI at the top, a DICOM CT series and its localizer in a patient's sub-folder: latent-stats
    uses the two volumes `prepare` uses, and skips the localizer as `prepare` does."""
    from dicom_series import write_series

    from ctpa_vq.data.phantom import make_phantom, write_phantom_nifti
    from ctpa_vq.data.prepare import prepare_dataset

    scans = tmp_path / "scans"
    write_phantom_nifti(scans / "top.nii.gz", (8, 16, 16), seed=1)
    write_series(scans / "patientA" / "study", make_phantom((8, 16, 16), seed=2))
    write_series(scans / "patientA" / "study", make_phantom((2, 16, 16), seed=3), series_number=9,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), file_prefix="scout")
    VQGAN3D.from_preset("tiny").save_pretrained(tmp_path / "model")

    assert main(["latent-stats", "--model", str(tmp_path / "model"), "--input", str(scans),
                 "--patch", "8", "16", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # two volumes of 8x16x16 voxels at 4x downsampling: 2 * (2 * 4 * 4) latent voxels per channel
    assert "latents over 64 voxels per channel" in out
    assert f"skipped {scans / 'patientA' / 'study'}#2: a localizer (scout) series, not a CT volume" in out

    report = prepare_dataset(scans, tmp_path / "prepared", val_fraction=0, progress=False, keep_identifiers=True)
    assert len(report.used_files) == 2 and len(report.skipped) == 1
