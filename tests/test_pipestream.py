"""csi.host.pipestream on real pipes: a producer's bytes arrive whole and in order through a
1 MiB pipe, its failure reaches the reader at the end, and a reader that stops early stops it."""

from __future__ import annotations

import fcntl
import os
import threading
from typing import IO

import pytest

from csi.errors import StrataError
from csi.host.pipestream import PIPE_BYTES, pipe_stream


def test_bytes_arrive_whole_through_a_big_pipe() -> None:
    data = os.urandom(3 * PIPE_BYTES + 12345)
    stream = pipe_stream(lambda out: [out.write(data[i:i + 70_000]) for i in range(0, len(data), 70_000)], "t")
    assert fcntl.fcntl(stream.fileno(), fcntl.F_GETPIPE_SZ) >= PIPE_BYTES
    assert stream.read() == data
    stream.close()


def test_a_failing_producer_fails_the_reader_at_the_end() -> None:
    def produce(out: IO[bytes]) -> None:
        out.write(b"partial")
        raise OSError(5, "the disk went away")

    stream = pipe_stream(produce, "t")
    with pytest.raises(StrataError, match="the disk went away"):
        stream.read()


def test_closing_early_stops_the_producer() -> None:
    finished = threading.Event()

    def produce(out: IO[bytes]) -> None:
        try:
            while True:
                out.write(b"x" * 65536)
        finally:
            finished.set()

    stream = pipe_stream(produce, "t")
    assert stream.read(10) == b"x" * 10
    stream.close()
    assert finished.wait(10), "the producer kept writing after the reader closed"
