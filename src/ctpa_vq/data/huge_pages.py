"""Ask the kernel to map a memory-mapped volume with 2 MB pages (``madvise(MADV_HUGEPAGE)``).

Copying a 128x256x256 patch out of a memory-mapped volume walks 64 MB of the file in 512-byte
rows; with 4 KB page-table entries the copy spends a good part of its time on TLB misses.
pyarrow maps Arrow files ``MAP_PRIVATE``, and Linux mostly mapped them with 4 KB entries in the
benchmark; with the advice (and a file system whose page cache holds large folios, e.g. ext4 or
XFS on a recent kernel) the pages are mapped with 2 MB entries. It changes nothing about what is
read from disk, only how the pages are mapped: on the benchmark's volumes, copying a patch got
10-20 % faster (BENCHMARKS.md, "Data throughput"). Where the advice is not supported (not
Linux, or no transparent huge pages), nothing changes.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import numpy as np

MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_PAGE = 4096


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def advise_huge_pages(view: np.ndarray) -> bool:
    """Advise 2 MB pages for the memory-mapped pages under ``view``; False where not applied.

    The range is widened to whole 4 KB pages, all of which belong to the same mapping as the
    view's first and last byte.
    """
    madvise = _madvise()
    if madvise is None or view.nbytes == 0:
        return False
    start = view.ctypes.data // _PAGE * _PAGE
    end = view.ctypes.data + view.nbytes
    return madvise(start, end - start, MADV_HUGEPAGE) == 0
