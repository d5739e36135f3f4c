"""Self-contained code for the Hub: load a pushed pipeline with diffusers alone, without `ctpa_vq`.

`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` runs code shipped in the repo:
`model_index.json` names the pipeline as `["pipeline_ctpa", "CTPAReconstructionPipeline"]` (a
file at the repo root) and the model as `"vqgan": ["modeling_vqgan3d", "VQGAN3D"]` (a file in
`vqgan/`). diffusers fetches only that one file per component and follows only direct relative
imports, so each file must hold everything it needs.

The files are *generated* from this package's own modules, never written by hand, so they cannot
drift from the code that trained the model: `bundle_module` takes a module and every module of
the package it imports (transitively), orders them dependencies first, drops the intra-package
imports and joins them into one source file. The result needs torch, diffusers, numpy and
nibabel, the package's own dependencies, not the package (pydicom / SimpleITK only to read a
DICOM series or an NRRD/MetaImage path, as in the package).
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

from .. import __version__

PACKAGE = __name__.split(".")[0]
PIPELINE_MODULE = f"{PACKAGE}.pipelines.reconstruction"
MODEL_MODULE = f"{PACKAGE}.models.vqgan"
PIPELINE_FILE = "pipeline_ctpa.py"
MODEL_FILE = "modeling_vqgan3d.py"
PIPELINE_CLASS = "CTPAReconstructionPipeline"
MODEL_CLASS = "VQGAN3D"


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{module}: no source file to bundle")
    return Path(spec.origin).read_text()


def _is_package(module: str) -> bool:
    return importlib.util.find_spec(module).submodule_search_locations is not None


def _relative_imports(module: str) -> list[ast.ImportFrom]:
    """`from .x import y` statements anywhere in `module` (function-level ones included)."""
    tree = ast.parse(_source(module))
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    package = module if _is_package(module) else module.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def _defining_module(target: str, name: str) -> str:
    """The module that defines `name`, following re-exports through package `__init__`s."""
    if not _is_package(target):
        return target
    if importlib.util.find_spec(f"{target}.{name}") is not None:
        raise ValueError(f"{target}: importing the submodule {name!r} itself cannot be bundled; import names from it")
    for node in _relative_imports(target):
        if any(alias.name == name for alias in node.names):
            return _defining_module(_absolute(target, node), name)
    raise ValueError(f"{target}: {name!r} is not re-exported from a submodule; cannot bundle it")


def _dependencies(module: str) -> list[str]:
    found = []
    for node in _relative_imports(module):
        for alias in node.names:
            if alias.asname not in (None, alias.name):
                raise ValueError(f"{module}: `import ... as` of package names cannot be bundled ({alias.name})")
            source = _defining_module(_absolute(module, node), alias.name)
            if source not in found:
                found.append(source)
    return found


def module_closure(entry: str) -> list[str]:
    """`entry` and the package modules it imports, transitively; dependencies come first."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(module: str) -> None:
        if module in ordered or module in visiting:
            return
        visiting.add(module)
        for dependency in _dependencies(module):
            visit(dependency)
        ordered.append(module)

    visit(entry)
    return ordered


def _stripped_body(module: str) -> str:
    """The module's source without its docstring, `__future__` import and intra-package imports."""
    source = _source(module)
    tree = ast.parse(source)
    drop: set[int] = set()
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        drop.update(range(body[0].lineno, body[0].end_lineno + 1))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "__future__"):
            drop.update(range(node.lineno, node.end_lineno + 1))
    lines = source.splitlines()
    kept = [line for number, line in enumerate(lines, start=1) if number not in drop]
    return "\n".join(kept).strip("\n")


def _top_level_names(module: str) -> set[str]:
    names = set()
    for node in ast.parse(_source(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def bundle_module(entry: str) -> str:
    """One self-contained source file: `entry` with every package module it needs, inlined."""
    modules = module_closure(entry)
    owner: dict[str, str] = {}
    for module in modules:
        for name in _top_level_names(module):
            if name in owner:
                raise ValueError(f"cannot bundle {entry}: {name!r} is defined in both {owner[name]} and {module}")
            owner[name] = module
    parts = [
        f'"""Generated from {PACKAGE} {__version__} by `{__name__}` (modules: {", ".join(modules)}).\n\n'
        f"Do not edit: regenerate it from the package. It needs torch, diffusers, numpy and nibabel, not {PACKAGE} "
        "(pydicom / SimpleITK only for DICOM or NRRD/MetaImage paths).\n"
        '"""\n\nfrom __future__ import annotations\n'
    ]
    for module in modules:
        parts.append(f"# {'-' * 20} {module.replace('.', '/')}.py\n\n{_stripped_body(module)}\n")
    return "\n\n".join(parts)


def pipeline_index(index: dict, component: str) -> dict:
    """`model_index.json` that points diffusers at the bundled files instead of the package."""
    return {
        **index,
        "_class_name": [PIPELINE_FILE.removesuffix(".py"), PIPELINE_CLASS],
        component: [MODEL_FILE.removesuffix(".py"), MODEL_CLASS],
    }


def remote_code_files(index: dict, component: str = "vqgan") -> dict[str, bytes]:
    """Repo path -> content of the files that make a saved pipeline loadable without the package."""
    return {
        "model_index.json": (json.dumps(pipeline_index(index, component), indent=2, sort_keys=True) + "\n").encode(),
        PIPELINE_FILE: bundle_module(PIPELINE_MODULE).encode(),
        f"{component}/{MODEL_FILE}": bundle_module(MODEL_MODULE).encode(),
    }


def write_remote_code(pipeline_dir: str | Path) -> list[Path]:
    """Turn a saved pipeline folder into the self-contained layout (in place); returns the files written.

    The folder then loads with `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`
    anywhere, and still with `CTPAReconstructionPipeline.from_pretrained(dir)` where the package is.
    """
    from ..utils.atomic import atomic_path
    from .model_source import local_model

    source = local_model(pipeline_dir)
    if not source.is_pipeline:
        raise FileNotFoundError(f"{source.root}: not a saved pipeline (no model_index.json)")
    written = []
    for name, content in remote_code_files(source.index, source.subfolder).items():
        with atomic_path(source.root / name) as temporary:
            temporary.write_bytes(content)
        written.append(source.root / name)
    return written


__all__ = ["bundle_module", "module_closure", "remote_code_files", "write_remote_code"]
