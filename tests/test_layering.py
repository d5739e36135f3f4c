"""Dependencies inside `ctpa_vq` point one way (docs/design.md, "Where things are"): each part imports
only itself and parts of lower layers; nothing imports the CLI or the training loop.

Read from the source with `ast` (every import, those inside functions included); nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ctpa_vq"

# part of the package -> its layer. A module may import its own part and parts of a lower layer, never
# a part of its own layer or a higher one (so `models` knows nothing of files: `data` is beside it).
LAYERS = {
    "utils": 0,  # atomic writes, the allocator: no CT, no model
    "models": 1,  # VQGAN3D, its HU window and training-data record
    "patching": 1,  # grid, blend weights, stitcher: any patch function
    "data": 1,  # volume files, prepare, the patch dataset, pseudonyms
    "hub": 2,  # where a model is, its card, the push, the bundled code
    "pipelines": 3,  # model + stitcher + data + model_source
    "evaluation": 4,  # metrics, regions, pictures, scoring with a pipeline
    "latents": 4,  # encode, latent statistics
    "training": 5,  # the Accelerate loop and all it needs
    "cli": 6,  # the `ctpa-vq` command: imported by nothing
}
# Outside `training/`, modules name the training module they need (`training.config`, `training.verify`):
# neither the loop nor the package, whose `__init__` exports the loop.
LOOP = ("ctpa_vq.training", "ctpa_vq.training.loop")


def _module_name(path: Path) -> str:
    parts = ["ctpa_vq", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources() -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is a package) for every module of `ctpa_vq`."""
    return {_module_name(p): (p.read_text(), p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, is_package: bool, node: ast.stmt, modules: set[str]) -> list[str]:
    """The `ctpa_vq` modules one import statement of `module` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "ctpa_vq"]
    if node.level == 0:
        target = node.module or ""
        if target.split(".")[0] != "ctpa_vq":
            return []
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
    return submodules or [target]


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (its version, its lazy names)


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """One line per import that goes against the layering (or comes from a part not in `LAYERS`)."""
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        part = _part(module)
        if part is None:
            continue
        if part not in LAYERS:
            found.append(f"{module}: part {part!r} has no layer; add it to LAYERS and to docs/design.md")
            continue
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(module, is_package, node, set(sources)):
                target_part = _part(target)
                where = f"{module}:{node.lineno} imports {target}"
                if target_part is None or target_part == part:
                    continue
                if target in LOOP and part != "training":
                    found.append(f"{where}: the training loop is imported by nothing outside training/")
                elif target_part not in LAYERS or LAYERS[target_part] >= LAYERS[part]:
                    found.append(f"{where}: {part} (layer {LAYERS[part]}) may not import "
                                 f"{target_part} (layer {LAYERS.get(target_part, '?')})")
    return found


def test_dependencies_point_one_way():
    found = violations(package_sources())
    assert not found, "\n".join(found)


def test_every_part_has_a_layer():
    """The table is the package's top level: no part missing, none left over."""
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert parts == set(LAYERS)


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("ctpa_vq.models.vqgan", "from ..pipelines import CTPAReconstructionPipeline", "models (layer 1) may not import pipelines"),
    ("ctpa_vq.models.vqgan", "from ..data.nifti import CTVolume", "models (layer 1) may not import data"),
    ("ctpa_vq.patching.stitcher", "import ctpa_vq.models.vqgan", "patching (layer 1) may not import models"),
    ("ctpa_vq.pipelines.reconstruction", "from ..evaluation.metrics import psnr_hu", "may not import evaluation"),
    ("ctpa_vq.data.nifti", "def f():\n    from ..cli import main", "data (layer 1) may not import cli"),
    ("ctpa_vq.training.validation", "from .. import cli", "training (layer 5) may not import cli"),
    ("ctpa_vq.evaluation.scoring", "from ..training.loop import train", "training loop"),
    ("ctpa_vq.latents.encode", "from ..training import train", "training loop"),
])
def test_a_wrong_import_is_reported(module, line, expected):
    """The check itself: one wrong import added to today's sources is reported, naming the module."""
    sources = package_sources()
    source, is_package = sources[module]
    sources[module] = (f"{source}\n{line}\n", is_package)
    found = violations(sources)
    assert len(found) == 1 and found[0].startswith(module) and expected in found[0], found
