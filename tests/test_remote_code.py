"""The bundled code for diffusers alone, and the generic diffusers loader with `ctpa_vq` installed.

The load through the Hub without `ctpa_vq` is in tests/test_hub.py (it needs the loopback server).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline
from ctpa_vq.hub.remote_code import MODEL_MODULE, PIPELINE_MODULE, bundle_module, write_remote_code
from lean_site import lean_site

# What the README promises a downstream user needs to load a pushed pipeline with diffusers alone.
LEAN_REQUIREMENTS = ["torch", "diffusers", "numpy", "nibabel"]
# The subprocess's float sums follow its thread count: the same as here, for bit-equal outputs.
def same_threads() -> dict[str, str]:
    """The subprocess's thread count: this process's now (the same float sum order)."""
    return {"OMP_NUM_THREADS": str(torch.get_num_threads())}
LEAN_PYTHON = [sys.executable, "-S"]  # -S: not this venv's site-packages (nor its .pth files), only PYTHONPATH

# A meta path finder that makes `import ctpa_vq` fail, for subprocesses that must run without it
# (the package is installed, editable or not, so removing it from PYTHONPATH is not enough).
BLOCK_CTPA_VQ = textwrap.dedent("""
    import importlib.abc, sys
    class _BlockCtpaVq(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "ctpa_vq":
                raise ModuleNotFoundError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _BlockCtpaVq())
    try:
        import ctpa_vq
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("ctpa_vq is importable: the blocker failed")
""")


CLINICAL_EXTRA = {"pydicom", "SimpleITK"}


def _imported_packages(source: str, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(source)
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_bundles_import_nothing_of_the_package():
    for entry in (MODEL_MODULE, PIPELINE_MODULE):
        imported = _imported_packages(bundle_module(entry))
        assert "ctpa_vq" not in imported and "." not in imported, entry
        assert imported <= {"__future__", "os", "zlib", "tempfile", "contextlib", "dataclasses", "pathlib", "typing",
                            "functools", "shutil", "logging", "json", "warnings",
                            "math", "itertools", "fractions", "numpy", "torch", "nibabel", "diffusers",
                            "huggingface_hub", "isal", *CLINICAL_EXTRA}, imported  # isal: guarded, optional
        # DICOM series and NRRD paths need the `clinical` extra only when one is read, as in the package
        assert not _imported_packages(bundle_module(entry), top_level_only=True) & CLINICAL_EXTRA, entry


def test_bundled_model_computes_what_the_package_model_computes(tmp_path):
    """The generated file, imported on its own, holds a VQGAN3D with the same weights and outputs."""
    path = tmp_path / "modeling_vqgan3d.py"
    path.write_text(bundle_module(MODEL_MODULE))
    spec = importlib.util.spec_from_file_location("bundled_vqgan3d", path)
    bundled = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bundled  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(bundled)
    finally:
        del sys.modules[spec.name]
    assert bundled.VQGAN3D is not VQGAN3D

    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny").eval()
    model.save_pretrained(tmp_path / "model")
    again = bundled.VQGAN3D.from_pretrained(tmp_path / "model").eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        expected, got = model(x), again(x)
    assert torch.equal(expected.sample, got.sample) and torch.equal(expected.indices, got.indices)
    assert again.latent_shape((600, 512, 512)) == (8, 150, 128, 128)


def test_generic_diffusers_loader_loads_a_saved_pipeline(tmp_path):
    """`DiffusionPipeline.from_pretrained(dir)` finds the pipeline class once it is imported from ctpa_vq."""
    torch.manual_seed(0)
    pipe = CTPAReconstructionPipeline(VQGAN3D.from_preset("tiny"))
    pipe.save_pretrained(tmp_path / "saved")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(loaded) is CTPAReconstructionPipeline and type(loaded.vqgan) is VQGAN3D
    original, again = pipe.vqgan.state_dict(), loaded.vqgan.state_dict()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_saved_pipeline_with_bundled_code_loads_without_ctpa_vq(tmp_path):
    """`write_remote_code` turns a saved folder into the Hub layout: it loads with diffusers alone and
    reconstructs what the package reconstructs; the package still loads it with its own classes."""
    torch.manual_seed(2)
    pipe = CTPAReconstructionPipeline(VQGAN3D.from_preset("tiny"))
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    write_remote_code(folder)
    assert json.loads((folder / "model_index.json").read_text())["vqgan"] == ["modeling_vqgan3d", "VQGAN3D"]

    volume = np.random.default_rng(0).uniform(-1000, 1500, (20, 24, 28)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    script = BLOCK_CTPA_VQ + textwrap.dedent(f"""
        import numpy as np
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = pipe(np.load({str(tmp_path / "volume.npy")!r}), patch_size=(16, 16, 16), return_latents=True)
        np.save({str(tmp_path / "remote.npy")!r}, out.reconstruction)
        assert not [m for m in sys.modules if m.split(".")[0] == "ctpa_vq"]
        print(type(pipe).__module__, type(pipe.vqgan).__module__)
    """)
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home"), **same_threads()}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["diffusers_modules.local.pipeline_ctpa", "diffusers_modules.local.modeling_vqgan3d"]

    expected = pipe(volume, patch_size=(16, 16, 16)).reconstruction  # same threads: same float sum order
    np.testing.assert_array_equal(np.load(tmp_path / "remote.npy"), expected)
    native = CTPAReconstructionPipeline.from_pretrained(folder)
    assert type(native.vqgan) is VQGAN3D


def lean_env(site: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of `LEAN_PYTHON` seeing only `site` (a `lean_site`)."""
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HOME": str(tmp_path / "hf_home"),
            **same_threads(), **extra}


@pytest.mark.slow
def test_bundled_pipeline_loads_where_only_torch_diffusers_numpy_nibabel_are_installed(tmp_path):
    """The README's promise, in an environment with exactly those packages and their requirements:
    no accelerate (diffusers then loads without `low_cpu_mem_usage`), no scipy, no ctpa_vq. The
    reconstruction equals the package's, and a bf16 load keeps the codebook in fp32, bit for bit.

    Failed before the fix with `ValueError: low_cpu_mem_usage cannot be False when
    keep_in_fp32_modules is True`."""
    torch.manual_seed(3)
    pipe = CTPAReconstructionPipeline(VQGAN3D.from_preset("tiny"))
    pipe.vqgan(torch.rand(2, 1, 16, 16, 16) * 2 - 1)  # a codebook initialised from data, as trained ones are
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    write_remote_code(folder)
    site = lean_site(LEAN_REQUIREMENTS, tmp_path / "site")
    volume = np.random.default_rng(0).uniform(-1000, 1500, (20, 24, 28)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np, torch
        absent = [m for m in ("accelerate", "ctpa_vq", "scipy") if importlib.util.find_spec(m) is not None]
        assert not absent, f"installed here: {{absent}}"
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = pipe(np.load({str(tmp_path / "volume.npy")!r}), patch_size=(16, 16, 16))
        np.save({str(tmp_path / "lean.npy")!r}, out.reconstruction)
        half = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True, torch_dtype=torch.bfloat16)
        assert half.vqgan.encoder.conv_in.weight.dtype == torch.bfloat16
        codebook = half.vqgan.quantizer.embedding
        assert codebook.dtype == torch.float32, codebook.dtype
        assert torch.equal(codebook, pipe.vqgan.quantizer.embedding)
        print(type(pipe).__name__)
    """)
    run = subprocess.run([*LEAN_PYTHON, "-c", script], env=lean_env(site, tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["CTPAReconstructionPipeline"]
    expected = pipe(volume, patch_size=(16, 16, 16)).reconstruction
    np.testing.assert_array_equal(np.load(tmp_path / "lean.npy"), expected)


def test_encode_and_decode_follow_vqmodel_outputs_on_request():
    """Tensors by default (the contract); `return_dict=True` gives diffusers' VQModel output types."""
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.autoencoders.vq_model import VQEncoderOutput

    torch.manual_seed(0)
    model = VQGAN3D.from_preset("tiny").eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        encoded = model.encode(x, return_dict=True)
        decoded = model.decode(z, return_dict=True)
        assert isinstance(encoded, VQEncoderOutput) and torch.equal(encoded.latents, z)
        assert isinstance(decoded, DecoderOutput) and torch.equal(decoded.sample, model.decode(z))
