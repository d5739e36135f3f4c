"""Write a large write-once file past the page cache (``O_DIRECT``).

A buffered `write` copies every byte into page-cache pages the kernel must first allocate. For
`prepare`, which writes each volume once and reads it back only when training starts, those pages
are pure cost: on the development VM, writing an 8 MB volume took 31 ms of system time buffered
and 0.7 ms direct (BENCHMARKS.md, "Prepare a collection"), and a TB-scale collection would evict
every useful page on the node. `DirectFile` collects writes in a page-aligned buffer and writes it
in whole blocks with ``O_DIRECT``; the tail that does not fill a block goes through the page
cache on `close`. Where ``O_DIRECT`` is missing (macOS, Windows) or refused (tmpfs, or a device
whose blocks are larger than `BLOCK`), it writes buffered, with the same bytes in the file.
"""

from __future__ import annotations

import errno
import io
import mmap
import os

BLOCK = 4096
"""Alignment of ``O_DIRECT`` offsets, lengths and memory (the largest logical block size in use)."""


class DirectFile(io.RawIOBase):
    """A write-only binary file (created or truncated) written with ``O_DIRECT`` where possible.

    `buffer_bytes` (a multiple of `BLOCK`) is the size of each direct write. Close it (or use it
    as a context manager) to write the tail; the bytes are then in the file, flushed to the device
    except the tail, which `os.fsync` (e.g. `utils.atomic.atomic_path`) flushes as usual.
    """

    def __init__(self, path: str | os.PathLike, buffer_bytes: int = 1 << 20):
        super().__init__()
        if buffer_bytes <= 0 or buffer_bytes % BLOCK:
            raise ValueError(f"buffer_bytes must be a positive multiple of {BLOCK}, got {buffer_bytes}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self.direct = hasattr(os, "O_DIRECT")
        self._fd = -1
        if self.direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT
                    raise
                self.direct = False
        if self._fd < 0:
            self._fd = os.open(path, flags, 0o666)
        self._buffer = mmap.mmap(-1, buffer_bytes)  # anonymous mappings are page-aligned
        self._filled = 0

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(len(view) - done, len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = view[done : done + take]
            self._filled += take
            done += take
            if self._filled == len(self._buffer):
                self._write_out(len(self._buffer))
        return done

    def _write_out(self, size: int) -> None:
        """Write the first `size` buffered bytes and keep the rest at the buffer's start."""
        written = 0
        with memoryview(self._buffer) as view:
            while written < size:
                try:
                    written += os.write(self._fd, view[written:size])
                except OSError as err:
                    if not (self.direct and err.errno == errno.EINVAL):
                        raise
                    self._stop_direct()  # a device with blocks larger than BLOCK: write buffered
        rest = self._filled - size
        self._buffer.move(0, size, rest)
        self._filled = rest

    def _stop_direct(self) -> None:
        import fcntl  # POSIX only, as O_DIRECT

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        if self.closed:
            return
        try:
            whole = self._filled - self._filled % BLOCK
            if whole:
                self._write_out(whole)
            if self._filled:  # the tail is shorter than a block: O_DIRECT cannot write it
                if self.direct:
                    self._stop_direct()
                self._write_out(self._filled)
        finally:
            os.close(self._fd)
            self._buffer.close()
            super().close()
