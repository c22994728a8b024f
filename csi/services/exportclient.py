"""The client side of the Diff export service's ExportDiff: a stream of chunks read as a file.

:class:`ExportDiffReader` — ``read``/``readinto`` over ExportDiff's messages. A stream broken
by the network (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) is opened again at the byte it
stopped (``starting_offset``: the bytes of a diff are deterministic), a few times with a short
back-off; a chunk at an unexpected offset, or a summary whose digest or size is not what was
read, is :class:`~csi.errors.DigestMismatch`; any other failure is raised as ``relay(error)``
makes it (by default :class:`~csi.errors.Relayed`, naming ``source``). ``close`` cancels a
stream that has not ended. Used by ``strata backup`` through the plugin's socket and by a node
pulling another node's layers.

**Two lanes.** Given ``connect`` (a node pulling from another node), the bytes come on the
owner's bulk lane (:mod:`csi.peers.bulk`): ``OpenExport`` over the channel (the same request,
the same checks as ExportDiff) answers a ticket and a port, ``connect(port)`` opens the TLS
socket, and the frames carry the same chunks and the same summary. An owner without the lane
(``OpenExport`` UNIMPLEMENTED or FAILED_PRECONDITION) is read through ExportDiff. A broken
lane resumes like a broken stream, with a new ticket.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Generator, Iterator

import grpc

from csi.errors import DigestMismatch, Relayed, Unavailable
from csi.host.pipestream import ReadStream
from csi.peers.bulk import receive
from csi.proto import export_pb2, export_pb2_grpc
from csi.services.readahead import read_ahead

log = logging.getLogger(__name__)

RESUME_ATTEMPTS = 5
READ_AHEAD = 4  # messages received and hashed ahead of the reader
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
_NO_LANE = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)
TICKET_TIMEOUT = 60.0  # seconds for OpenExport
Event = tuple[int, bytes] | export_pb2.ExportSummary  # (offset, data) or the stream's summary


class ExportDiffReader(ReadStream):
    """See the module docstring. ``on_bytes(n)`` hears of every chunk received."""

    def __init__(self, stub: export_pb2_grpc.DiffExportStub, snapshot: str, base: str, *,
                 source: str = "the plugin", relay: Callable[[grpc.RpcError], Exception] | None = None,
                 on_bytes: Callable[[int], None] | None = None,
                 connect: Callable[[int], ssl.SSLSocket] | None = None) -> None:
        self._stub, self._snapshot, self._base, self._source = stub, snapshot, base, source
        self._connect = connect
        self._relay = relay or (lambda exc: Relayed(exc.code().name, f"ExportDiff of {snapshot} from {source}: "
                                                                     f"{exc.details()}"))
        self._on_bytes = on_bytes
        self._hash = hashlib.sha256()
        self._position = 0  # bytes received (and hashed)
        self._buffer = b""  # the current chunk, consumed from ``_at``
        self._at = 0
        self._done = False
        self._error: BaseException | None = None
        self._closed = False
        self._attempts = 0
        self._messages: Iterator[Event] | None = None  # opened by the reader thread's first _next
        self._call: grpc.Future | None = None  # the ExportDiff call being read, if any
        self._sock: ssl.SSLSocket | None = None  # the bulk lane's socket being read, if any
        self._chunks = read_ahead(self._receive(), READ_AHEAD, f"pull-{snapshot}"[:64], on_stop=self._cancel)

    def _open(self) -> Iterator[Event]:
        request = export_pb2.ExportDiffRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=self._snapshot),
                                               base=self._base, starting_offset=self._position,
                                               compression=export_pb2.NONE)
        if self._connect is not None:
            try:
                ticket = self._stub.OpenExport(request, timeout=TICKET_TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() not in _NO_LANE:
                    raise
                log.info("%s has no bulk lane (%s); reading through ExportDiff", self._source, exc.details())
                self._connect = None
            else:
                self._sock = self._connect(ticket.port)
                return self._bulk(receive(self._sock, ticket.ticket), self._position)
        self._call = self._stub.ExportDiff(request)
        return (m.summary if m.HasField("summary") else (m.offset, m.data) for m in self._call)

    @staticmethod
    def _bulk(frames: Generator[bytes, None, bytes], offset: int) -> Iterator[Event]:
        while True:
            try:
                data = next(frames)
            except StopIteration as end:
                yield export_pb2.ExportSummary.FromString(end.value)
                return
            yield offset, data
            offset += len(data)

    def _next(self) -> Event | None:
        while True:
            try:
                if self._messages is None:
                    self._messages = self._open()
                return next(self._messages, None)
            except (grpc.RpcError, Unavailable) as exc:
                resumable = isinstance(exc, Unavailable) or exc.code() in _RESUMABLE
                if self._closed or not resumable or self._attempts >= RESUME_ATTEMPTS:
                    if isinstance(exc, grpc.RpcError):
                        raise self._relay(exc) from None
                    raise
                self._attempts += 1
                log.warning("export stream of %s from %s broke at byte %d (%s); resuming", self._snapshot,
                            self._source, self._position, exc.details() if isinstance(exc, grpc.RpcError) else exc)
                self._drop()
                time.sleep(0.2 * self._attempts)

    def _receive(self) -> Iterator[bytes]:
        """The stream's data, checked and hashed message by message, ending after the summary
        was checked; run ahead of the reader in a thread (:func:`read_ahead`), so receiving
        and hashing overlap with what the reader does with the data."""
        while True:
            event = self._next()
            if event is None:
                raise Unavailable(f"the export stream of {self._snapshot} from {self._source} ended early")
            if isinstance(event, export_pb2.ExportSummary):
                actual = self.digest()
                if actual != event.digest or self._position != event.size:
                    raise DigestMismatch(f"ExportDiff of {self._snapshot} from {self._source}: received "
                                         f"{self._position} bytes hashing to {actual}; announced "
                                         f"{event.size} bytes, {event.digest}")
                return
            offset, data = event
            if offset != self._position:
                raise DigestMismatch(f"{self._source} sent {self._snapshot} at offset {offset}, "
                                     f"expected {self._position}")
            self._hash.update(data)
            self._position += len(data)
            if self._on_bytes is not None:
                self._on_bytes(len(data))
            yield data

    def _fill(self) -> bool:
        """Make the current chunk hold unread data; False at the (verified) end."""
        while self._at >= len(self._buffer):
            if self._error is not None:
                raise self._error
            if self._done:
                return False
            try:
                self._buffer, self._at = next(self._chunks), 0
            except StopIteration:
                self._done = True
                return False
            except BaseException as exc:
                self._error = exc  # raised again by every later read: never a clean end
                raise
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of the current message when ``n`` is negative or larger):
        a message's data is handed on without a copy when it is read whole."""
        if not self._fill():
            return b""
        start, end = self._at, len(self._buffer)
        if n is not None and 0 <= n < end - start:
            end = start + n
        self._at = end
        return self._buffer if start == 0 and end == len(self._buffer) else self._buffer[start:end]

    def readinto(self, buf: bytearray | memoryview) -> int:
        if not self._fill():
            return 0
        n = min(len(buf), len(self._buffer) - self._at)
        buf[:n] = memoryview(self._buffer)[self._at:self._at + n]
        self._at += n
        return n

    @property
    def count(self) -> int:
        """Bytes received so far."""
        return self._position

    def digest(self) -> str:
        """``sha256:…`` of the bytes received so far (of the whole blob once read to its end)."""
        return "sha256:" + self._hash.hexdigest()

    def _drop(self) -> None:
        """Let go of the current stream: a gRPC call is cancelled, a bulk socket closed."""
        call, sock = self._call, self._sock
        self._messages = self._call = self._sock = None
        if call is not None:
            call.cancel()
        if sock is not None:
            sock.close()

    def _cancel(self) -> None:
        """Unblock the reader thread: cancel the call, shut the socket (it closes it)."""
        self._closed = True
        call, sock = self._call, self._sock
        if call is not None:
            call.cancel()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Stop the stream (cancelled unless it has ended) and its reader thread."""
        self._closed = True
        self._chunks.close()  # type: ignore[attr-defined]  # a thread reading ahead ends first
        self._drop()
