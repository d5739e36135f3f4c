"""Every `ctpa_vq` name that the documentation, the examples and the benchmarks use still imports:
a moved or renamed module fails here, naming the file that still refers to the old place."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted({*REPO.glob("*.md"), *REPO.glob("docs/**/*.md"), *REPO.glob("src/ctpa_vq/templates/*.md")})
SCRIPTS = sorted({*REPO.glob("*.py"), *REPO.glob("examples/**/*.py"), *REPO.glob("benchmarks/*.py")})

# `ctpa_vq.a.b.Name` anywhere in a document (a backquoted reference or a `python -m` command); a
# reference may be wrapped after a dot. `from ctpa_vq.a import x, y` lines of its code blocks.
DOTTED = re.compile(r"\bctpa_vq(?:\.(?:\n\s*)?[A-Za-z_]\w*)*")
FROM_IMPORT = re.compile(r"^\s*from (ctpa_vq(?:\.\w+)*) import \(?([\w ,]+)", re.MULTILINE)


def _names_in_document(text: str) -> set[str]:
    names = {re.sub(r"\s", "", match) for match in DOTTED.findall(text)}
    for module, imported in FROM_IMPORT.findall(text):
        names.update(f"{module}.{name.strip()}" for name in imported.split(",") if name.strip())
    return names


def _names_in_script(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "ctpa_vq")
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] == "ctpa_vq":
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _referenced_names() -> dict[str, set[str]]:
    """Dotted name -> the files (relative to the repository) that use it."""
    used: dict[str, set[str]] = {}
    for path in DOCUMENTS + SCRIPTS:
        text = path.read_text()
        found = _names_in_document(text) if path.suffix == ".md" else _names_in_script(text)
        for name in found:
            used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return used


def _resolve(dotted: str):
    """The module or attribute a dotted name refers to: its longest importable module prefix, then
    attributes of it. Raises ImportError or AttributeError."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name is None or not dotted.startswith(err.name):  # a dependency is missing, not the name
                raise
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(dotted)


REFERENCED = _referenced_names()


def test_the_scan_finds_the_documented_names():
    """The scan itself works: the docs' own snippet and a wrapped reference are among its finds."""
    assert {"ctpa_vq.VQGAN3D", "ctpa_vq.CTPAReconstructionPipeline"} <= REFERENCED.keys()
    assert "docs/inference.md" in REFERENCED["ctpa_vq.CTPAReconstructionPipeline"]
    assert "ctpa_vq.utils.allocator.keep_freed_memory" in REFERENCED
    assert len(REFERENCED) > 40


@pytest.mark.parametrize("name", sorted(REFERENCED))
def test_referenced_name_resolves(name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"{name} (used in {', '.join(sorted(REFERENCED[name]))}) does not resolve: {err}")


def test_package_names_load_on_first_use():
    """`import ctpa_vq` loads no torch; its public names and version are there all the same."""
    script = (
        "import sys, ctpa_vq\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'imported eagerly'\n"
        "assert {'VQGAN3D', 'CTPAReconstructionPipeline', '__version__'} <= set(dir(ctpa_vq))\n"
        "from ctpa_vq import VQGAN3D, CTPAReconstructionPipeline\n"
        "from ctpa_vq.models import VQGAN3D as model_class\n"
        "from ctpa_vq.pipelines import CTPAReconstructionPipeline as pipeline_class\n"
        "assert VQGAN3D is model_class is ctpa_vq.VQGAN3D and CTPAReconstructionPipeline is pipeline_class\n"
        "print(ctpa_vq.__version__)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == importlib.metadata.version("ctpa-vq")


def test_unknown_package_attribute_is_an_attribute_error():
    import ctpa_vq

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        ctpa_vq.NoSuchName  # noqa: B018
    assert not hasattr(ctpa_vq, "NoSuchName")
