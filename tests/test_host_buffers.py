"""HostBuffers: the events that guard the pinned buffers are recorded on the copying GPU's stream."""

from __future__ import annotations

import torch

from ctpa_vq.patching.host_buffers import HostBuffers


class _RecordingEvent:
    """Stands in for ``torch.cuda.Event``: remembers the stream each ``record`` was given.

    Like the real one, ``record()`` without a stream takes ``torch.cuda.current_stream()``.
    """

    def __init__(self) -> None:
        self.streams: list[tuple[str, int]] = []

    def record(self, stream=None) -> None:
        self.streams.append(stream if stream is not None else torch.cuda.current_stream())


def _current_stream(device=None) -> tuple[str, int]:
    """Stands in for ``torch.cuda.current_stream``: the stream of ``device``, of cuda:0 (the
    current device, as in a process that never called ``torch.cuda.set_device``) when None."""
    index = 0 if device is None or torch.device(device).index is None else torch.device(device).index
    return ("stream of cuda", index)


def test_events_are_recorded_on_the_stream_of_the_buffers_gpu_not_the_current_device(monkeypatch):
    """The copies of a pipeline on cuda:1 run on cuda:1's current stream (copies and kernels take
    the stream of their tensors' GPU), so the events guarding the pinned buffers must be recorded
    there: an event on cuda:0's idle stream completes at once and the last batch would be read
    before its copy finished. No GPU here: ``torch.cuda.current_stream`` and ``torch.cuda.Event``
    are replaced by stand-ins that record which stream the buffers ask for; this checks the
    request, not CUDA's behaviour."""
    monkeypatch.setattr(torch.cuda, "current_stream", _current_stream)
    monkeypatch.setattr(torch.cuda, "Event", _RecordingEvent)
    buffers = HostBuffers(pinned=True, device=torch.device("cuda:1"))
    buffers.mark(0)
    buffers.mark(1)
    assert [event.streams for event in buffers.events] == [[("stream of cuda", 1)], [("stream of cuda", 1)]]
