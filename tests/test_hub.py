"""Pushing to a Hub over loopback: weights round trip, private by default, token never leaks, re-runs.

The server is `tests/hub_server.py` (why a stand-in: see its docstring), started on 127.0.0.1 on a
free port in a subprocess. Downloads run in a subprocess with `HF_ENDPOINT`, as a user would.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file

from ctpa_vq import VQGAN3D
from ctpa_vq.hub.push import HubPushError, push_to_hub
from ctpa_vq.pipelines import CTPAReconstructionPipeline

from hub_server import serve

TOKEN = "hf_" + secrets.token_hex(16)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub():
    """A loopback Hub; yields its endpoint and stops it afterwards."""
    with serve(TOKEN) as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def no_xet(monkeypatch):
    """The stand-in has no Xet storage: huggingface_hub uses the LFS protocol instead."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _client_env(hub: str, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1")
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A saved tiny model with a recipe and a metrics log, as a training run leaves it."""
    torch.manual_seed(0)
    folder = tmp_path / "model"
    VQGAN3D.from_preset("tiny").save_pretrained(folder)
    (folder / "recipe.yaml").write_text("model:\n  preset: tiny\noptim:\n  lr: 1.0e-4\n")
    (folder / "metrics.csv").write_text(
        "step,loss,val/psnr_hu,val/ssim_hu,clipped_above\n10,0.5,,,\n20,0.3,28.5,0.87,0.0021\n30,0.2,,,\n"
    )
    return folder


@pytest.fixture
def pipeline_dir(tmp_path) -> Path:
    """A saved pipeline (model under vqgan/) with the recipe and metrics, as training exports it."""
    torch.manual_seed(1)
    folder = tmp_path / "pipeline"
    CTPAReconstructionPipeline(vqgan=VQGAN3D.from_preset("tiny")).save_pretrained(folder)
    (folder / "config.yaml").write_text("model:\n  preset: tiny\n")
    (folder / "metrics.csv").write_text("step,loss,val_psnr,val_ssim,val_clipped_fraction\n5,0.4,24.0,0.8,0.01\n")
    return folder


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_push_then_from_pretrained_returns_same_weights(hub, model_dir, pipeline_dir, tmp_path):
    push_to_hub(pipeline_dir, "lab/ctpa-vq-pipeline", endpoint=hub, token=TOKEN)  # the library call
    pushed = subprocess.run(  # the command
        [sys.executable, "-m", "ctpa_vq.cli", "push", "--model", str(model_dir), "--repo-id", "lab/ctpa-vq-tiny"],
        env=_client_env(hub, tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "(private)" in pushed.stdout
    assert TOKEN not in pushed.stdout + pushed.stderr

    downloaded = tmp_path / "downloaded"
    load = textwrap.dedent(f"""
        from ctpa_vq import VQGAN3D
        VQGAN3D.from_pretrained("lab/ctpa-vq-tiny").save_pretrained({str(downloaded / "model")!r})
        VQGAN3D.from_pretrained("lab/ctpa-vq-pipeline", subfolder="vqgan").save_pretrained({str(downloaded / "sub")!r})
    """)
    loaded = subprocess.run([sys.executable, "-c", load], env=_client_env(hub, tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert TOKEN not in loaded.stdout + loaded.stderr

    weights = "diffusion_pytorch_model.safetensors"
    for source, copy in [(model_dir, "model"), (pipeline_dir / "vqgan", "sub")]:
        original, again = load_file(source / weights), load_file(downloaded / copy / weights)
        assert original.keys() == again.keys()
        assert all(torch.equal(original[k], again[k]) for k in original)  # codebook buffers included

    api = HfApi(endpoint=hub, token=TOKEN)
    assert api.repo_info("lab/ctpa-vq-tiny").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub, token=False).repo_info("lab/ctpa-vq-tiny")
    files = {s.rfilename for s in api.repo_info("lab/ctpa-vq-tiny").siblings}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "recipe.yaml", "metrics.csv"} <= files

    # The token is in no file written under the model folder, the client cache or the uploaded repo.
    assert _files_containing(model_dir, TOKEN) == []
    assert _files_containing(tmp_path / "hf_home" / "hub", TOKEN) == []
    snapshot = Path(api.snapshot_download("lab/ctpa-vq-tiny", cache_dir=tmp_path / "snapshot"))
    assert _files_containing(snapshot, TOKEN) == []

    card = ModelCard.load(snapshot / "README.md")
    assert {"medical-imaging", "ct", "3d", "vq-gan"} <= set(card.data.tags)
    psnr = [r for r in card.data.eval_results if r.metric_type == "psnr"]
    assert psnr and psnr[0].metric_value == pytest.approx(28.5)
    assert "Not for diagnosis" in card.text and "0.210%" in card.text  # clipped fraction from the metrics
    assert 'VQGAN3D.from_pretrained("lab/ctpa-vq-tiny")' in card.text

    pipeline_files = {s.rfilename for s in api.repo_info("lab/ctpa-vq-pipeline").siblings}
    assert {"model_index.json", "vqgan/config.json", "vqgan/" + weights, "config.yaml", "metrics.csv"} <= pipeline_files
    pipeline_card = ModelCard.load(api.hf_hub_download("lab/ctpa-vq-pipeline", "README.md", cache_dir=tmp_path / "cache"))
    assert 'subfolder="vqgan"' in pipeline_card.text and "val_clipped_fraction = 1.000%" in pipeline_card.text


def test_pushed_pipeline_loads_with_the_pipeline_class(hub, pipeline_dir, tmp_path):
    push_to_hub(pipeline_dir, "lab/pipeline-class", endpoint=hub, token=TOKEN)
    load = textwrap.dedent("""
        from ctpa_vq.hub.model_source import resolve_model
        from ctpa_vq.pipelines import load_reconstruction_pipeline
        pipe = load_reconstruction_pipeline("lab/pipeline-class")
        source = resolve_model("lab/pipeline-class")
        print(type(pipe).__name__, type(pipe.vqgan).__name__, source.local, source.subfolder)
    """)
    loaded = subprocess.run([sys.executable, "-c", load], env=_client_env(hub, tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["CTPAReconstructionPipeline", "VQGAN3D", "False", "vqgan"]


def test_push_after_an_interrupted_one_completes(hub, model_dir, tmp_path):
    """An interrupted push uploaded the weights' LFS object but never committed: the repo shows nothing."""
    api = HfApi(endpoint=hub, token=TOKEN)
    api.create_repo("lab/interrupted", private=True)
    weights = model_dir / "diffusion_pytorch_model.safetensors"
    api.preupload_lfs_files("lab/interrupted", additions=[CommitOperationAdd(weights.name, str(weights))])
    assert "config.json" not in {s.rfilename for s in api.repo_info("lab/interrupted").siblings}

    result = push_to_hub(model_dir, "lab/interrupted", endpoint=hub, token=TOKEN)
    files = {s.rfilename for s in api.repo_info("lab/interrupted").siblings}
    assert set(result.files) == files
    assert Path(api.hf_hub_download("lab/interrupted", weights.name, cache_dir=tmp_path / "cache")).read_bytes() == weights.read_bytes()


def test_rerun_push_is_safe_and_updates_changed_files(hub, model_dir, tmp_path):
    first = push_to_hub(model_dir, "lab/rerun", endpoint=hub, token=TOKEN)
    again = push_to_hub(model_dir, "lab/rerun", endpoint=hub, token=TOKEN)
    assert again.commit_oid == first.commit_oid  # nothing changed: no new commit

    (model_dir / "metrics.csv").write_text("step,val/psnr_hu\n40,30.25\n")
    updated = push_to_hub(model_dir, "lab/rerun", endpoint=hub, token=TOKEN)
    assert updated.commit_oid != first.commit_oid
    api = HfApi(endpoint=hub, token=TOKEN)
    card = ModelCard.load(api.hf_hub_download("lab/rerun", "README.md", cache_dir=tmp_path / "cache"))
    assert card.data.eval_results[0].metric_value == pytest.approx(30.25)


def test_revision_goes_to_its_own_branch(hub, model_dir):
    main = push_to_hub(model_dir, "lab/branches", endpoint=hub, token=TOKEN)
    (model_dir / "metrics.csv").write_text("step,val/psnr_hu\n50,33.5\n")
    result = push_to_hub(model_dir, "lab/branches", revision="ablation-1", endpoint=hub, token=TOKEN,
                         commit_message="ablation")
    api = HfApi(endpoint=hub, token=TOKEN)
    assert api.repo_info("lab/branches", revision="ablation-1").sha == result.commit_oid
    assert api.repo_info("lab/branches").sha == main.commit_oid != result.commit_oid


def test_private_push_refuses_an_existing_public_repo(hub, model_dir):
    api = HfApi(endpoint=hub, token=TOKEN)
    api.create_repo("lab/already-public", private=False)
    with pytest.raises(HubPushError, match="public"):
        push_to_hub(model_dir, "lab/already-public", endpoint=hub, token=TOKEN)
    assert "config.json" not in {s.rfilename for s in api.repo_info("lab/already-public").siblings}

    public = push_to_hub(model_dir, "lab/public", private=False, endpoint=hub, token=TOKEN)
    assert public.private is False and api.repo_info("lab/public").private is False


def test_wrong_token_fails_cleanly_without_echoing_it(hub, model_dir, tmp_path):
    wrong = "hf_" + secrets.token_hex(16)
    pushed = subprocess.run(
        [sys.executable, "-m", "ctpa_vq.cli", "push", "--model", str(model_dir), "--repo-id", "lab/denied"],
        env=_client_env(hub, tmp_path, token=wrong), capture_output=True, text=True, timeout=120,
    )
    assert pushed.returncode == 2
    assert "error" in pushed.stderr and "lab/denied" in pushed.stderr
    assert wrong not in pushed.stdout + pushed.stderr
    assert "Traceback" not in pushed.stderr


def test_folder_that_is_not_a_model_is_rejected(tmp_path, hub):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(HubPushError, match="config.json"):
        push_to_hub(tmp_path, "lab/nothing", endpoint=hub, token=TOKEN)
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "missing", "lab/nothing", endpoint=hub, token=TOKEN)


def test_root_model_card_is_the_packaged_template():
    link = REPO_ROOT / "model_card.md"
    assert link.is_symlink()
    assert link.resolve() == (REPO_ROOT / "src" / "ctpa_vq" / "templates" / "model_card.md").resolve()


@pytest.mark.slow
def test_pushed_pipeline_loads_without_ctpa_vq(hub, pipeline_dir, tmp_path):
    """From the Hub, where only torch, diffusers, numpy and nibabel are installed (no ctpa_vq, no
    accelerate): the bundled code reconstructs what the package does."""
    from lean_site import lean_site
    from test_remote_code import LEAN_PYTHON, LEAN_REQUIREMENTS, lean_env

    push_to_hub(pipeline_dir, "lab/no-install", endpoint=hub, token=TOKEN)
    volume = np.random.default_rng(1).uniform(-1024, 2000, (18, 20, 36)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    script = textwrap.dedent(f"""
        import importlib.util
        import numpy as np
        assert importlib.util.find_spec("accelerate") is None and importlib.util.find_spec("ctpa_vq") is None
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("lab/no-install", trust_remote_code=True)
        out = pipe(np.load({str(tmp_path / "volume.npy")!r}), patch_size=(16, 16, 16), overlap=0.5)
        np.save({str(tmp_path / "remote.npy")!r}, out.reconstruction)
        print(type(pipe).__name__, type(pipe.vqgan).__name__)
    """)
    site = lean_site(LEAN_REQUIREMENTS, tmp_path / "site")
    env = lean_env(site, tmp_path, HF_ENDPOINT=hub, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1")
    loaded = subprocess.run([*LEAN_PYTHON, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["CTPAReconstructionPipeline", "VQGAN3D"]
    expected = CTPAReconstructionPipeline.from_pretrained(pipeline_dir)(volume, patch_size=(16, 16, 16), overlap=0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "remote.npy"), expected.reconstruction)


def _write_patient_volumes(folder: Path) -> None:
    """Three patients with identifying file names, two spacings, two slice counts."""
    rng = np.random.default_rng(0)
    for name, slices, spacing in [("PAT-7731-SMITH", 12, 2.5), ("PAT-8802-JONES", 16, 1.25), ("PAT-9913-BROWN", 12, 2.5)]:
        hu = rng.integers(-1024, 1800, (20, 24, slices), dtype=np.int16)
        hu[0, 0, 0] = -1100 if name.startswith("PAT-88") else 0
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, spacing, 1.0])), folder / f"{name}.nii.gz")


def test_push_scrubs_local_paths_and_describes_the_data(hub, tmp_path):
    from ctpa_vq.data.prepare import prepare_dataset

    (tmp_path / "nifti").mkdir()
    _write_patient_volumes(tmp_path / "nifti")
    dataset = tmp_path / "prepared"
    prepare_dataset(tmp_path / "nifti", dataset, val_fraction=0.34, progress=False)
    folder = tmp_path / "export"
    CTPAReconstructionPipeline(VQGAN3D.from_preset("tiny")).save_pretrained(folder)
    (folder / "config.yaml").write_text(
        f"dataset:\n  path: {dataset}\n  example: {tmp_path}/nifti/PAT-7731-SMITH.nii.gz\n"
        "training:\n  output_dir: outputs/run\n"
    )
    (folder / "metrics.csv").write_text("step,val_psnr\n10,21.5\n")
    (tmp_path / "provenance.yaml").write_text("sites: two university hospitals\ncontrast_phase: pulmonary arterial\n")

    push_to_hub(folder, "lab/scrubbed", endpoint=hub, token=TOKEN, provenance=tmp_path / "provenance.yaml")
    api = HfApi(endpoint=hub, token=TOKEN)
    snapshot = Path(api.snapshot_download("lab/scrubbed", cache_dir=tmp_path / "snapshot"))
    for needle in (str(tmp_path), "PAT-", "SMITH", "/tmp/"):
        assert _files_containing(snapshot, needle) == [], needle
    recipe = yaml.safe_load((snapshot / "config.yaml").read_text())
    assert recipe["dataset"]["path"] == "<local path removed>" and recipe["training"]["output_dir"] == "outputs/run"

    card = ModelCard.load(snapshot / "README.md")
    data = card.data.to_dict()["data_provenance"]
    assert data["patients"] == {"train": 2, "validation": 1} and sum(data["volumes"].values()) == 3
    assert data["slices_min"] == 12 and data["slices_max"] == 16  # D is the NIfTI z axis
    assert data["spacing_mm_min"] == [1.25, 0.7, 0.7] and data["spacing_mm_max"] == [2.5, 0.7, 0.7]
    assert data["hu_min"] == -1100 and data["sites"] == "two university hospitals"
    assert data["scanners"] == "not stated"
    spec = card.data.to_dict()["input_specification"]
    assert spec["hu_window"] == [-1024.0, 2048.0] and spec["orientation"].startswith("RAS")
    assert "memoris" in card.text and "De-identification" in card.text and "@software" in card.text
    assert 'DiffusionPipeline.from_pretrained("lab/scrubbed", trust_remote_code=True)' in card.text
    assert [entry["step"] for entry in card.data.to_dict()["version_history"]] == [10]

    (folder / "metrics.csv").write_text("step,val_psnr\n20,23.5\n")
    push_to_hub(folder, "lab/scrubbed", endpoint=hub, token=TOKEN, dataset_dir=dataset)
    again = ModelCard.load(api.hf_hub_download("lab/scrubbed", "README.md", cache_dir=tmp_path / "cache2"))
    assert [entry["step"] for entry in again.data.to_dict()["version_history"]] == [10, 20]


def test_card_reports_validation_quality_not_the_ssim_training_loss(model_dir):
    """metrics.csv's `ssim_loss` column (1 - SSIM, a training term) is not an SSIM result of the model."""
    from ctpa_vq.hub.card import build_model_card

    (model_dir / "metrics.csv").write_text("step,loss,l1,ssim_loss,val_psnr,val_ssim\n5,0.3,0.05,0.2,,\n5,,,,27.5,0.81\n")
    card = build_model_card(model_dir, "lab/ctpa-vq-tiny")
    reported = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert reported == {"val_psnr": 27.5, "val_ssim": 0.81}
    assert set(card.data.to_dict()["version_history"][-1]["metrics"]) == {"val_psnr", "val_ssim"}


@pytest.mark.parametrize("stored, shown", [([16, 32, 32], "[16, 32, 32], 25% overlap"), (None, "planned per volume")])
def test_card_states_the_inference_patch_the_pipeline_uses(tmp_path, stored, shown):
    """A trained model's card says which grid the pipeline reconstructs with by default."""
    from ctpa_vq.data.phantom import make_phantom
    from ctpa_vq.hub.card import build_model_card
    from ctpa_vq.models.input_spec import describe_training_data

    record = describe_training_data([(2.5, 0.7, 0.7)], [make_phantom((12, 32, 32), seed=1)], (-1024.0, 2048.0), (16, 32, 32))
    VQGAN3D.from_preset("tiny", training_data=record, inference_patch_size=stored).save_pretrained(tmp_path / "model")
    card = build_model_card(tmp_path / "model", "lab/ctpa-vq-tiny")
    assert f"| inference patch (D, H, W), the pipeline's default | {shown}" in card.text
