"""The bulk lane: a layer's bytes from one node to another on a TLS socket beside the gRPC channel.

Why a second socket: grpcio's Python streams topped out near 250 MiB/s here (every message
crosses the core's completion queue and the GIL as a Python object), while a plain TLS socket
in one process moved 1.5 GiB/s (both measured ad hoc on loopback, not by a test or the bench;
bench_crossnode measures the restore this lane carries). The gRPC channel keeps the authority; the lane only carries bytes.

Contract:

* **Tickets** (:class:`TicketBook`). A caller the gRPC channel authenticated (ServiceAccount
  token, TokenReview) and authorized for a request asks for a ticket over that channel; the
  owner keeps ``(payload, deadline)`` under the ticket's sha256 and hands the ticket out: 32
  random bytes in hex, usable once, for ``TICKET_SECONDS``. A payload is a callable returning
  an iterator of ``bytes`` chunks that ends with one :class:`Trailer`; it is called only when
  the ticket is redeemed. Tickets never reach a log.
* **Wire** (:class:`BulkServer`): TLS (the node's certificate, reloaded on rotation,
  :class:`csi.peers.tls.ServerContexts`; never plain TCP). The client sends
  ``HELLO + <ticket hex> + "\\n"`` within ``HELLO_SECONDS``; the server answers frames of
  ``kind (1 byte) + length (4 bytes, big-endian) + body``: ``D`` data, then one ``E`` whose
  body is the trailer (the stream is complete), or ``X`` whose body is
  ``"<error class>: <message>"`` (a :mod:`csi.errors` class name; an unknown, expired or used
  ticket is ``PermissionDenied``). The server closes after ``E`` or ``X``. At most
  ``MAX_STREAMS`` streams at once (more wait in the kernel's accept queue).
* **Client** (:func:`receive`): the frames of one ticket as ``bytes`` chunks; the trailer is
  returned by the generator (``StopIteration.value``). A stream that ends without ``E``
  (connection closed, reset, timed out) is :class:`~csi.errors.Unavailable`; an ``X`` frame
  is raised as its :mod:`csi.errors` class. Closing the generator closes the socket; the
  server then stops producing (its payload iterator is closed).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from csi import errors
from csi.errors import InvalidArgument, PermissionDenied, StrataError, Unavailable
from csi.peers.tls import ServerContexts, TlsFiles, split_address

log = logging.getLogger("strata.peers.bulk")

HELLO = b"STRATA-BULK/1 "
TICKET_SECONDS = 60.0
HELLO_SECONDS = 10.0
IDLE_SECONDS = 120.0  # a send or receive that makes no progress this long ends the stream
MAX_STREAMS = 16
MAX_FRAME = 16 << 20
_HEADER = struct.Struct(">cI")
DATA, END, ERROR = b"D", b"E", b"X"


@dataclass(frozen=True)
class Trailer:
    """What a payload's stream ends with (e.g. a serialized summary)."""

    body: bytes


Payload = Callable[[], Iterator["bytes | Trailer"]]


class TicketBook:
    """Tickets -> payloads, each usable once before its deadline (see the module docstring)."""

    def __init__(self, seconds: float = TICKET_SECONDS) -> None:
        self.seconds = seconds
        self._open: dict[bytes, tuple[Payload, float]] = {}
        self._lock = threading.Lock()

    def issue(self, payload: Payload) -> str:
        ticket = secrets.token_bytes(32)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_, deadline) in self._open.items() if deadline < now]:
                del self._open[key]
            self._open[hashlib.sha256(ticket).digest()] = (payload, now + self.seconds)
        return ticket.hex()

    def redeem(self, ticket: str) -> Payload:
        """The ticket's payload, once; PermissionDenied for an unknown, used or expired one."""
        try:
            raw = bytes.fromhex(ticket)
        except ValueError:
            raw = b""
        with self._lock:
            entry = self._open.pop(hashlib.sha256(raw).digest(), None) if len(raw) == 32 else None
        if entry is None or entry[1] < time.monotonic():
            raise PermissionDenied("the bulk ticket is unknown, used or expired: ask for a new one")
        return entry[0]

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


def _read_exact(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise Unavailable(f"the bulk stream ended in the middle of {what}")
        got += k
    return buf


def _error_frame(exc: BaseException) -> bytes:
    if isinstance(exc, StrataError):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = "StrataError: the sending node failed (see its log)"
    body = text.encode()[:4096]
    return _HEADER.pack(ERROR, len(body)) + body


class BulkServer:
    """The lane's listener (see the module docstring). ``stop(grace)`` returns an event set
    once it stopped, as ``grpc.Server.stop`` does, so it is stopped with the gRPC servers."""

    def __init__(self, address: str, tls: TlsFiles, tickets: TicketBook) -> None:
        host, port = split_address(address)
        self._contexts = ServerContexts(tls)
        self.tickets = tickets
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server((host, port), family=family, backlog=64)
        except OSError as exc:
            raise StrataError(f"cannot listen on {address} for the bulk lane: {exc.strerror}") from exc
        self.port: int = self._listener.getsockname()[1]
        self._slots = threading.BoundedSemaphore(MAX_STREAMS)
        self._stopped = threading.Event()
        self._streams: set[socket.socket] = set()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="bulk-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.05)
                continue
            self._slots.acquire()
            threading.Thread(target=self._serve, args=(conn, peer), name="bulk-stream", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        stream: Iterator[bytes | Trailer] | None = None
        try:
            conn.settimeout(HELLO_SECONDS)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._contexts.current().wrap_socket(conn, server_side=True)
            conn = tls
            with self._guard:
                self._streams.add(tls)
            hello = bytearray()
            while not hello.endswith(b"\n"):
                piece = tls.recv(len(HELLO) + 66 - len(hello))
                if not piece or len(hello) + len(piece) > len(HELLO) + 65:
                    raise InvalidArgument("malformed bulk request")
                hello += piece
            if not hello.startswith(HELLO):
                raise InvalidArgument("malformed bulk request")
            payload = self.tickets.redeem(hello[len(HELLO):-1].decode("ascii", "replace"))
            tls.settimeout(IDLE_SECONDS)
            stream = payload()
            for item in stream:
                if isinstance(item, Trailer):
                    tls.sendall(_HEADER.pack(END, len(item.body)) + item.body)
                    break
                if item:
                    tls.sendall(_HEADER.pack(DATA, len(item)))
                    tls.sendall(item)
            else:
                raise StrataError("the payload ended without a trailer")
        except OSError as exc:  # ssl.SSLError included
            log.info("bulk stream to %s ended: %s", peer, exc)
        except BaseException as exc:  # noqa: BLE001 - told to the receiver, then logged
            if not isinstance(exc, StrataError):
                log.exception("bulk stream to %s failed", peer)
            else:
                log.info("bulk stream to %s refused: %s", peer, exc)
            try:
                conn.sendall(_error_frame(exc))
            except (OSError, ValueError):
                pass
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            with self._guard:
                self._streams.discard(conn)  # type: ignore[arg-type]
            try:
                conn.close()
            finally:
                self._slots.release()

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop accepting; streams still running get ``grace`` seconds, then are cut."""
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        except OSError:
            pass
        self._listener.close()
        deadline = time.monotonic() + (grace or 0)
        while time.monotonic() < deadline:
            with self._guard:
                if not self._streams:
                    break
            time.sleep(0.05)
        with self._guard:
            for sock in list(self._streams):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)
        done = threading.Event()
        done.set()
        return done


def _raise_remote(body: bytes) -> None:
    name, _, message = body.decode("utf-8", "replace").partition(": ")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, StrataError)):
        cls = StrataError
    raise cls(message)


def receive(sock: ssl.SSLSocket, ticket: str) -> Generator[bytes, None, bytes]:
    """The data of ``ticket``'s stream on ``sock`` (connected, TLS done); returns the trailer
    (see the module docstring). The socket is closed when the generator ends or is closed."""
    try:
        sock.settimeout(IDLE_SECONDS)
        sock.sendall(HELLO + ticket.encode("ascii") + b"\n")
        while True:
            kind, length = _HEADER.unpack(_read_exact(sock, _HEADER.size, "a frame header"))
            if length > MAX_FRAME:
                raise Unavailable(f"the bulk stream sent a frame of {length} bytes (at most {MAX_FRAME})")
            body = bytes(_read_exact(sock, length, "a frame"))
            if kind == DATA:
                yield body
            elif kind == END:
                return body  # the generator's value: the trailer
            elif kind == ERROR:
                _raise_remote(body)
            else:
                raise Unavailable(f"the bulk stream sent a frame of unknown kind {kind!r}")
    except socket.timeout as exc:
        raise Unavailable(f"the bulk stream stalled for {IDLE_SECONDS:.0f} s") from exc
    except OSError as exc:  # ssl.SSLError included
        raise Unavailable(f"the bulk stream broke: {exc}") from exc
    finally:
        sock.close()


__all__ = ["BulkServer", "Payload", "TicketBook", "Trailer", "receive"]
