"""`DirectFile`: the bytes written are the file's, whether O_DIRECT is used or refused."""

from __future__ import annotations

import errno
import os

import numpy as np
import pyarrow as pa
import pytest

from ctpa_vq.utils import direct_io
from ctpa_vq.utils.direct_io import BLOCK, DirectFile

# Chunk sizes that cross the 2-block buffer in every way: smaller than a block, exactly one,
# larger than the buffer, and a tail that does not fill a block.
CHUNKS = [1, 4095, BLOCK, 3 * BLOCK + 17, 100, 2 * BLOCK, 5, 20_000, 7]


def _chunks() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in CHUNKS]


def _o_direct_works(folder) -> bool:
    """An independent probe: can this folder's file system open a file with O_DIRECT?"""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    return True


def test_the_file_holds_every_byte_written_in_order(tmp_path):
    chunks = _chunks()
    path = tmp_path / "out.bin"
    with DirectFile(path, buffer_bytes=2 * BLOCK) as f:
        assert f.direct == _o_direct_works(tmp_path)
        for chunk in chunks:
            assert f.write(chunk) == len(chunk)
    assert path.read_bytes() == b"".join(chunks)


def test_a_refused_o_direct_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """tmpfs answers O_DIRECT with EINVAL: the file is then written buffered, same bytes."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    chunks = _chunks()
    with DirectFile(tmp_path / "out.bin", buffer_bytes=BLOCK) as f:
        assert not f.direct
        for chunk in chunks:
            f.write(chunk)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(chunks)


def test_a_direct_write_refused_midway_continues_buffered(tmp_path, monkeypatch):
    """A device whose logical blocks exceed 4096 bytes refuses the aligned write itself (EINVAL):
    the rest of the file is written buffered, same bytes."""
    import fcntl

    real_write = os.write
    refused = []

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # as such a device: every direct write fails
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", refusing_write)
    chunks = _chunks()
    with DirectFile(tmp_path / "out.bin", buffer_bytes=2 * BLOCK) as f:
        for chunk in chunks:
            f.write(chunk)
        assert not f.direct
    assert len(refused) == int(_o_direct_works(tmp_path))  # one refusal, then buffered
    assert (tmp_path / "out.bin").read_bytes() == b"".join(chunks)


def test_other_open_errors_are_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        DirectFile(tmp_path / "missing-folder" / "out.bin")
    with pytest.raises(ValueError, match="multiple of 4096"):
        DirectFile(tmp_path / "out.bin", buffer_bytes=1000)


def test_an_arrow_stream_written_through_it_reads_back(tmp_path):
    """The way `prepare` uses it: pyarrow's IPC stream writer on top."""
    table = pa.table({"x": np.arange(100_003, dtype=np.int16), "s": [str(i) for i in range(100_003)]})
    path = tmp_path / "t.arrow"
    with DirectFile(path) as f:
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
    with pa.memory_map(str(path)) as source:
        assert pa.ipc.open_stream(source).read_all().equals(table)
