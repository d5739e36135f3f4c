"""Double-buffered pinned host memory for asynchronous copies between the CPU and a GPU."""

from __future__ import annotations

import torch


class HostBuffers:
    """Two alternating host buffers for asynchronous copies to or from a GPU.

    Pinned memory makes ``non_blocking`` copies truly asynchronous; an event per buffer keeps a
    buffer from being refilled, or read, before the copy that last used it has finished.

    Args:
        pinned: whether the copies go through these buffers at all.
        device: the GPU on the other side of the copies. They run on that GPU's current stream,
            which is not the current device's when the GPU is, say, ``cuda:1`` in a process that
            never called ``torch.cuda.set_device``; the events are recorded there.
    """

    def __init__(self, pinned: bool, device: torch.device) -> None:
        self.pinned = pinned
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def next(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        slot, self.turn = self.turn, self.turn ^ 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        buf = self.buffers[slot]
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = self.buffers[slot] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return slot, buf[: shape[0]]

    def mark(self, slot: int) -> None:
        """Record that the copy just issued on the device's current stream uses buffer ``slot``."""
        event = self.events[slot] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))

    def wait(self, slot: int, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` once the copy into buffer ``slot`` has finished."""
        self.events[slot].synchronize()
        return buf
