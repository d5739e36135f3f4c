"""keep_freed_memory: large freed tensors are reused instead of returned to the kernel."""

from __future__ import annotations

import ctypes.util
import json
import statistics
import subprocess
import sys

import pytest

PAGES = 64 * 2**20 // 4096  # 4 KiB pages of one 64 MiB block: above glibc's largest mmap threshold

CHILD = """
import json, resource, sys, torch
if sys.argv[1] == "keep":
    from ctpa_vq.utils.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.ones(1)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4).fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults_per_block(mode: str) -> list[int]:
    """Page faults of each of 16 allocate-fill-free rounds of a 64 MiB block, in a fresh process."""
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.split("\n")[-2])


@pytest.mark.skipif(sys.platform != "linux" or "libc.so" not in str(ctypes.util.find_library("c")), reason="glibc only")
def test_freed_activations_are_reused_without_page_faults():
    """By default every 64 MiB block is a fresh mmap the kernel faults in page by page; kept, the
    freed block is reused and the rounds after the first fault (almost) nothing.

    Compared as the median round of each process (steady state), so stray faults of a loaded
    machine in a few rounds do not decide the outcome.
    """
    default, kept = _faults_per_block("default"), _faults_per_block("keep")
    assert statistics.median(default[1:]) > 0.9 * PAGES, default  # what the setting is there to avoid
    assert statistics.median(kept[1:]) < 0.1 * PAGES, kept
    assert statistics.median(kept[1:]) < statistics.median(default[1:]) / 10
