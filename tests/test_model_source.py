"""`resolve_model`: a pipeline folder, a model folder or a Hub repo id, and what is none of them, named."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ctpa_vq import CTPAReconstructionPipeline, VQGAN3D
from ctpa_vq.hub.model_source import ModelSourceError, resolve_model
from ctpa_vq.hub.remote_code import write_remote_code
from ctpa_vq.pipelines import load_reconstruction_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved alone (`model/`) and as a pipeline (`pipeline/`, model under `vqgan/`)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("saved")
    model = VQGAN3D.from_preset("tiny")
    model.save_pretrained(root / "model")
    CTPAReconstructionPipeline(vqgan=model).save_pretrained(root / "pipeline")
    return root


def test_a_pipeline_folder_holds_the_model_in_its_vqgan_component(saved):
    source = resolve_model(saved / "pipeline")
    assert source.local and source.is_pipeline
    assert source.subfolder == "vqgan" and source.model_path == saved / "pipeline" / "vqgan"
    assert source.index["vqgan"][1] == "VQGAN3D"

    alone = resolve_model(str(saved / "model"))
    assert alone.local and not alone.is_pipeline
    assert alone.subfolder is None and alone.model_path == saved / "model" and alone.index == {}


def test_the_bundled_code_layout_resolves_to_the_same_component(saved, tmp_path):
    folder = tmp_path / "bundled"
    CTPAReconstructionPipeline(vqgan=VQGAN3D.from_pretrained(saved / "model")).save_pretrained(folder)
    write_remote_code(folder)
    source = resolve_model(folder)
    assert source.subfolder == "vqgan" and source.index["vqgan"] == ["modeling_vqgan3d", "VQGAN3D"]
    assert source.bundles_code and not resolve_model(saved / "pipeline").bundles_code


def test_a_pipeline_without_its_weights_is_named_before_diffusers_is_asked(saved, tmp_path):
    folder = tmp_path / "torn"
    CTPAReconstructionPipeline(vqgan=VQGAN3D.from_pretrained(saved / "model")).save_pretrained(folder)
    for weights in (folder / "vqgan").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / 'vqgan'}: no weights in this model folder")):
        load_reconstruction_pipeline(folder)


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p.mkdir(), "neither a saved pipeline (model_index.json) nor a model (config.json)"),
        (lambda p: p.write_text("weights?"), "not a folder"),
        (lambda p: (p.mkdir(), (p / "model_index.json").write_text("{not json")), "model_index.json: not a readable JSON"),
        (lambda p: (p.mkdir(), (p / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DModel"]}))),
         "model_index.json: no VQGAN3D component"),
        (lambda p: None, "no such model folder"),
    ],
    ids=["empty", "file", "bad-index", "no-vqgan", "missing"],
)
def test_what_is_no_model_raises_an_error_naming_it(tmp_path, make, problem):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(ModelSourceError, match=re.escape(problem)) as raised:
        resolve_model(path)
    assert str(path) in str(raised.value)


def test_a_repo_id_the_hub_cannot_answer_is_named(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelSourceError, match="lab/nowhere: no such local folder, and the Hub lookup failed"):
        resolve_model("lab/nowhere")
