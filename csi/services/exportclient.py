"""The client side of the Diff export service's ExportDiff: a stream of chunks read as a file.

:class:`ExportDiffReader` — ``read``/``readinto`` over ExportDiff's messages. A stream broken
by the network (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) is opened again at the byte it
stopped (``starting_offset``: the bytes of a diff are deterministic), a few times with a short
back-off; a chunk at an unexpected offset, or a summary whose digest or size is not what was
read, is :class:`~csi.errors.DigestMismatch`; any other failure is raised as ``relay(error)``
makes it (by default :class:`~csi.errors.Relayed`, naming ``source``). ``close`` cancels a
stream that has not ended. Used by ``strata backup`` through the plugin's socket and by a node
pulling another node's layers.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator

import grpc

from csi.errors import DigestMismatch, Relayed, Unavailable
from csi.host.pipestream import ReadStream
from csi.proto import export_pb2, export_pb2_grpc

log = logging.getLogger(__name__)

RESUME_ATTEMPTS = 5
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class ExportDiffReader(ReadStream):
    """See the module docstring. ``on_bytes(n)`` hears of every chunk received."""

    def __init__(self, stub: export_pb2_grpc.DiffExportStub, snapshot: str, base: str, *,
                 source: str = "the plugin", relay: Callable[[grpc.RpcError], Exception] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self._stub, self._snapshot, self._base, self._source = stub, snapshot, base, source
        self._relay = relay or (lambda exc: Relayed(exc.code().name, f"ExportDiff of {snapshot} from {source}: "
                                                                     f"{exc.details()}"))
        self._on_bytes = on_bytes
        self._hash = hashlib.sha256()
        self._position = 0
        self._buffer = b""
        self._done = False
        self._attempts = 0
        self._messages = self._open()

    def _open(self) -> Iterator[export_pb2.ExportDiffResponse]:
        return self._stub.ExportDiff(export_pb2.ExportDiffRequest(
            snapshot=export_pb2.SnapshotRef(snapshot_id=self._snapshot), base=self._base,
            starting_offset=self._position, compression=export_pb2.NONE))

    def _next(self) -> export_pb2.ExportDiffResponse | None:
        while True:
            try:
                return next(self._messages, None)  # type: ignore[call-overload]
            except grpc.RpcError as exc:
                if exc.code() not in _RESUMABLE or self._attempts >= RESUME_ATTEMPTS:
                    raise self._relay(exc) from None
                self._attempts += 1
                log.warning("export stream of %s from %s broke at byte %d (%s); resuming", self._snapshot,
                            self._source, self._position, exc.details())
                time.sleep(0.2 * self._attempts)
                self._messages = self._open()

    def read(self, n: int = -1) -> bytes:
        while not self._buffer and not self._done:
            message = self._next()
            if message is None:
                raise Unavailable(f"the export stream of {self._snapshot} from {self._source} ended early")
            if message.HasField("summary"):
                self._done = True
                actual = "sha256:" + self._hash.hexdigest()
                if actual != message.summary.digest or self._position != message.summary.size:
                    raise DigestMismatch(f"ExportDiff of {self._snapshot} from {self._source}: received "
                                         f"{self._position} bytes hashing to {actual}; announced "
                                         f"{message.summary.size} bytes, {message.summary.digest}")
                break
            if message.offset != self._position:
                raise DigestMismatch(f"{self._source} sent {self._snapshot} at offset {message.offset}, "
                                     f"expected {self._position}")
            self._buffer = message.data
            self._hash.update(message.data)
            self._position += len(message.data)
            if self._on_bytes is not None:
                self._on_bytes(len(message.data))
        if n is None or n < 0:
            n = len(self._buffer)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def close(self) -> None:
        cancel = getattr(self._messages, "cancel", None)
        if cancel is not None and not self._done:
            cancel()
