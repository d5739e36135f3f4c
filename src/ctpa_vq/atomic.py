"""Atomic file writes: a temporary file beside the target, renamed into place on success."""

from __future__ import annotations

import os
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
