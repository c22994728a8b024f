"""Byte streams made by a producer thread, and file data sent without a copy through Python.

* :func:`pipe_stream` — runs ``produce(out)`` in a thread writing into a pipe and returns
  the read end as a buffered file. The reader sees the producer's failure at end of
  stream (a :class:`~csi.errors.StrataError` chained to it); closing the reader early
  stops the producer (it gets ``BrokenPipeError``, which is not a failure). ``tell``
  works and ``seek`` moves forward (by reading), so ``tarfile.open(mode="r:")`` reads it.
  Diffs use it so a layer's tar is never staged on disk. The pipe holds 1 MiB (64 KiB by
  default), so the producer's sendfile stalls less while the reader is busy.
* :func:`send_file_data` — ``size`` bytes of a file, zero-padded to a tar block, written
  to a file descriptor with sendfile(2); a file that shrank while it was read is padded
  to the announced size, so a tar stays valid. :func:`write_all` — ``os.write`` until done.
"""

from __future__ import annotations

import fcntl
import io
import os
import tarfile
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import IO, Any

from csi.errors import StrataError

PIPE_BYTES = 1 << 20  # the pipe's capacity (F_SETPIPE_SZ; an unprivileged process gets up to /proc/sys/fs/pipe-max-size)


def pipe_stream(produce: Callable[[IO[bytes]], None], name: str) -> IO[bytes]:
    """The bytes ``produce`` writes to its argument, read while it writes them."""
    read_fd, write_fd = os.pipe()
    with suppress(OSError):  # a bigger pipe: fewer stalls of the producer's sendfile (64 KiB by default)
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with io.BufferedWriter(_PipeWriteEnd(write_fd, "wb"), buffer_size=1 << 16) as out:
                produce(out)
        except BrokenPipeError:
            pass  # the reader stopped early
        except BaseException as exc:  # handed to the reader
            failures.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return io.BufferedReader(_PipeReader(read_fd, thread, failures), buffer_size=1 << 20)


class _PipeWriteEnd(io.FileIO):
    """The pipe's write end; ``tell`` counts the bytes written through it (a pipe cannot
    seek, and ``tarfile`` asks for the position when it starts writing)."""

    written = 0

    def write(self, data: Any) -> int | None:
        n = super().write(data)
        self.written += n or 0
        return n

    def tell(self) -> int:
        return self.written


class _PipeReader(io.RawIOBase):
    """Read end of the producer's pipe; at EOF re-raises the producer's failure."""

    def __init__(self, fd: int, thread: threading.Thread, failures: list[BaseException]) -> None:
        self._fd, self._thread, self._failures, self._pos = fd, thread, failures, 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if whence == io.SEEK_END or target < self._pos:
            raise io.UnsupportedOperation("a diff stream can only seek forward")
        scratch = bytearray(min(1 << 20, max(target - self._pos, 1)))
        while self._pos < target:
            view = memoryview(scratch)[: target - self._pos]
            if self.readinto(view) == 0:
                break
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = os.readv(self._fd, [buffer])
        self._pos += n
        if n == 0:
            self._thread.join()
            if self._failures:
                raise StrataError(f"diff stream failed: {self._failures[0]}") from self._failures[0]
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._thread.join()
        super().close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def send_file_data(fd: int, path: str | os.PathLike[str], size: int) -> int:
    """Send ``size`` bytes of ``path`` plus padding to a tar block; return bytes written."""
    sent = 0
    with open(path, "rb") as source:
        while sent < size:
            n = os.sendfile(fd, source.fileno(), sent, min(size - sent, 1 << 30))
            if n == 0:
                break
            sent += n
    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    write_all(fd, bytes(padded - sent))
    return padded


class ReadStream:
    """What a read-only file object needs beyond ``read``, for stream adapters (readers that
    hash, count or reassemble chunks): ``readinto`` (tarfile and zstandard use it),
    ``readable``, and ``drain`` (read what is left, e.g. a tar's padding after its end)."""

    def read(self, n: int = -1) -> bytes:  # pragma: no cover - subclasses read
        raise NotImplementedError

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
