"""Atomic, durable writes: a temporary file or folder beside the target, flushed to disk, renamed.

The rename alone protects readers from half-written files while the machine stays up; after a
power loss or a node crash the file system may still hold the new name with empty contents
unless the data (and the folder entry) were fsynced first. Hence `fsync_tree` before a rename
and `fsync_dir` of the parent after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; on success rename it to `path`.

    On any error the temporary file is removed and `path` is untouched, so a reader never sees
    a half-written file. `suffix` keeps the extension writers dispatch on (e.g. ".nii.gz").
    The file gets the permissions a plain `open()` would give, not mkstemp's 0600.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder under a folder (the folder itself included), to disk."""
    path = Path(path)
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `new` in `target`'s place: flushed to disk, then renamed.

    A folder cannot be renamed over a non-empty one, so an existing `target` is first moved
    aside to `.previous-<name>` and removed once `new` is in place; a reader sees the old
    folder or the new one, never a half-written one. `new` must be on `target`'s filesystem.
    """
    new, target = Path(new), Path(target)
    fsync_tree(new)
    previous = target.with_name(f".previous-{target.name}")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    new.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def partial_folder(target: str | os.PathLike) -> Path:
    """Where a folder for `target` is written before it takes `target`'s place: `.partial-<name>` beside it."""
    target = Path(target)
    return target.with_name(f".partial-{target.name}")


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield the (absent) `partial_folder(target)` to write; on success it replaces `target` (`replace_folder`).

    The leftover of a write killed before its rename is cleared first; on an error the partial
    folder is removed and `target` is untouched.
    """
    target, partial = Path(target), partial_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_folder(partial, target)
