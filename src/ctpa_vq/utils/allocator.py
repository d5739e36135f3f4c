"""Keep freed memory in the process (glibc malloc), so large activations do not cost page faults.

Patch-wise inference on a CPU allocates and frees activations of hundreds of MB per patch.
glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap`
and returns it with `munmap` on free, so each patch touches fresh pages that the kernel must
fault in and zero: with the `tiny` model on 61x256x256, 2.4 million page faults per volume
and system time close to user time. With mmap disabled and trimming off, freed blocks stay
in the heap and the next patch reuses them: 33 thousand faults and system time near zero
(BENCHMARKS.md, "Patch grid"). The cost: the process keeps its peak heap until it exits.

`keep_freed_memory()` sets this through `mallopt`; the `ctpa-vq` command calls it, since it
owns its process. Libraries embedding the pipeline may call it, or set the same through the
environment before Python starts: `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_MAX = -4
_NEVER = -1  # M_TRIM_THRESHOLD of -1 disables trimming (mallopt(3))


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc malloc to never `mmap` allocations nor trim the heap; False where this is not
    glibc (musl, macOS, Windows), where nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
