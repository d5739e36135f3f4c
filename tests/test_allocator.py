"""keep_freed_memory: large freed tensors are reused instead of returned to the kernel."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from ctpa_vq.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    x = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux" or "libc.so" not in str(ctypes.util.find_library("c")), reason="glibc only")
def test_freed_activations_are_reused_without_page_faults():
    """By default each 64 MiB allocation is a fresh mmap the kernel faults in page by page
    (16384 faults of 4 KiB each, 8 times); kept, only the first one faults."""
    default, kept = _faults("default"), _faults("keep")
    assert default > 8 * 16384 * 0.9
    assert kept < 2 * 16384
