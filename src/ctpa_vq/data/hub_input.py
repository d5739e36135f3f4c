"""``prepare --input hf://datasets/ORG/NAME[/PATH]``: a Hub dataset repo's volumes, fetched one patient at a time.

Listing and downloads go through ``huggingface_hub.HfFileSystem`` with the token from the usual
place (``HF_TOKEN`` or ``hf auth login``; never printed) and the endpoint ``HF_ENDPOINT``. The
top level under the path is listed once (one tree call: the patients); each patient's files are
fetched into a temporary folder when its turn comes, prepared as a local folder would be, and
deleted, so the disk holds about one patient per process, never the whole repo.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

HUB_PREFIX = "hf://"


def is_hub_path(location: str | os.PathLike) -> bool:
    return str(location).startswith(HUB_PREFIX)


def _file_system():
    from huggingface_hub import HfFileSystem

    return HfFileSystem(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _repo_path(location: str) -> str:
    """``hf://datasets/ORG/NAME/PATH`` -> ``datasets/ORG/NAME/PATH`` (what HfFileSystem takes)."""
    path = location[len(HUB_PREFIX):].strip("/")
    if not path.startswith("datasets/") or len(path.split("/")) < 3:
        raise ValueError(f"{location}: expected hf://datasets/ORG/NAME[/PATH]")
    return path


def list_hub_entries(location: str) -> list[tuple[str, bool]]:
    """(name, is_folder) of each entry directly under ``location``, sorted by name.

    Raises:
        FileNotFoundError: no such repo (or no access to it: check the token) or path.
    """
    root = _repo_path(location)
    try:
        listing = _file_system().ls(root, detail=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{location}: no such dataset repo or path, or no access to it (is the token "
                                f"set: HF_TOKEN or `hf auth login`?) ({err})") from None
    return sorted((posixpath.basename(entry["name"]), entry["type"] == "directory") for entry in listing)


@contextmanager
def fetched(location: str, entries: Sequence[str]) -> Iterator[Path]:
    """A temporary local folder holding ``entries`` (top-level names under ``location``, files or folders,
    with their sub-paths), deleted on exit."""
    file_system, root = _file_system(), _repo_path(location)
    with tempfile.TemporaryDirectory(prefix="ctpa-vq-hub-") as local:
        for entry in entries:
            remote = f"{root}/{entry}"
            files = file_system.find(remote) if file_system.isdir(remote) else [remote]
            for path in files:
                target = Path(local, posixpath.relpath(path, root))
                target.parent.mkdir(parents=True, exist_ok=True)
                file_system.get_file(path, str(target))
        yield Path(local)
