"""A site-packages folder holding only some distributions and their requirements, for subprocesses
that must run as in a fresh environment where only those are installed.

`lean_site(["torch", "diffusers", "numpy", "nibabel"], folder)` links, from this interpreter's
site-packages, the files of each named distribution and of every distribution it requires
(transitively, markers evaluated, extras left out) into `folder`. `python -S` with
`PYTHONPATH=folder` then sees exactly those: anything else (accelerate, ctpa_vq, scipy) is not
installed there; `importlib.util.find_spec` and `importlib.metadata` both say so, as they would
after `pip install torch diffusers numpy nibabel` in a new venv.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
from pathlib import Path

from packaging.requirements import Requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `names` need, themselves included (extras not taken)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this environment does not have either
        found[name] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def lean_site(names: list[str], folder: Path) -> Path:
    """Link the top-level entries (packages, modules, `.dist-info`) of `requirement_closure(names)` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist in requirement_closure(names):
        root = Path(dist.locate_file(""))
        for entry in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if entry == "__pycache__" or entry.endswith(".pth") or (folder / entry).exists():
                continue
            if (root / entry).exists():
                (folder / entry).symlink_to(root / entry)
    return folder
