"""The bulk lane's wire (csi.peers.bulk) on real TLS sockets over loopback, with certificates
the test makes: tickets used once and expiring, errors carried as strata's error classes, a
cut or truncated stream never read as complete, a receiver that goes away stops the sender's
payload, plain TCP and untrusted certificates refused, certificates reloaded on rotation.
The end-to-end use (OpenExport between two nodes in network namespaces) is in
test_channel.py."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer_client import read_until_closed
from peer_pki import PEER_NAME, Pki, make_pki

from csi.errors import NotFound, PermissionDenied, StrataError, Unavailable
from csi.peers.bulk import BulkServer, TicketBook, Trailer, receive
from csi.peers.tls import TlsFiles, client_context


@pytest.fixture
def lane(pki: Pki) -> Iterator[BulkServer]:
    server = BulkServer("127.0.0.1:0", TlsFiles(pki.cert, pki.key), TicketBook())
    yield server
    server.stop(1).wait()


def connect(server: BulkServer, ca: Path) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return client_context(ca).wrap_socket(raw, server_hostname=PEER_NAME)


def fetch(server: BulkServer, ca: Path, ticket: str) -> tuple[bytes, bytes]:
    frames = receive(connect(server, ca), ticket)
    got = []
    while True:
        try:
            got.append(next(frames))
        except StopIteration as end:
            return b"".join(got), end.value


def test_a_ticket_streams_its_payload_once(lane: BulkServer, pki: Pki) -> None:
    chunks = [bytes([i]) * (1 << 20) for i in range(5)] + [b"tail"]
    opened = []

    def payload() -> Iterator[bytes | Trailer]:
        opened.append(1)
        yield from chunks
        yield Trailer(b"summary")

    ticket = lane.tickets.issue(payload)
    assert len(bytes.fromhex(ticket)) == 32
    assert opened == []  # nothing is produced before the ticket is redeemed
    data, trailer = fetch(lane, pki.ca, ticket)
    assert data == b"".join(chunks) and trailer == b"summary" and opened == [1]
    with pytest.raises(PermissionDenied, match="ticket"):
        fetch(lane, pki.ca, ticket)
    with pytest.raises(PermissionDenied):
        fetch(lane, pki.ca, "00" * 32)
    assert len(lane.tickets) == 0


def test_tickets_expire(pki: Pki) -> None:
    server = BulkServer("127.0.0.1:0", TlsFiles(pki.cert, pki.key), TicketBook(seconds=0.2))
    try:
        ticket = server.tickets.issue(lambda: iter([Trailer(b"")]))
        time.sleep(0.4)
        with pytest.raises(PermissionDenied):
            fetch(server, pki.ca, ticket)
    finally:
        server.stop(1).wait()


def test_a_payload_error_reaches_the_receiver_as_its_class(lane: BulkServer, pki: Pki) -> None:
    def missing() -> Iterator[bytes | Trailer]:
        yield b"x" * 100
        raise NotFound("snapshot snap-1@node-a was deleted")

    with pytest.raises(NotFound, match="was deleted"):
        fetch(lane, pki.ca, lane.tickets.issue(missing))

    def broken() -> Iterator[bytes | Trailer]:
        raise RuntimeError("secret internals")
        yield b""  # pragma: no cover

    with pytest.raises(StrataError) as info:
        fetch(lane, pki.ca, lane.tickets.issue(broken))
    assert "secret internals" not in str(info.value)  # only strata's own errors say what happened

    def endless_without_trailer() -> Iterator[bytes | Trailer]:
        yield b"data"

    with pytest.raises(StrataError, match="ended"):
        fetch(lane, pki.ca, lane.tickets.issue(endless_without_trailer))


def test_a_cut_stream_is_unavailable_never_complete(lane: BulkServer, pki: Pki) -> None:
    """The receiver cannot mistake a sender that died for the end of the stream."""
    started, release = threading.Event(), threading.Event()

    def slow() -> Iterator[bytes | Trailer]:
        yield b"a" * 1000
        started.set()
        release.wait(10)
        yield Trailer(b"never sent")

    frames = receive(connect(lane, pki.ca), lane.tickets.issue(slow))
    assert next(frames) == b"a" * 1000
    started.wait(5)
    lane.stop(0)  # the sender goes away mid-stream
    with pytest.raises(Unavailable):
        next(frames)
    release.set()


def test_a_receiver_that_goes_away_stops_the_payload(lane: BulkServer, pki: Pki) -> None:
    closed = threading.Event()

    def endless() -> Iterator[bytes | Trailer]:
        try:
            while True:
                yield b"z" * (1 << 20)
        finally:
            closed.set()

    frames = receive(connect(lane, pki.ca), lane.tickets.issue(endless))
    assert len(next(frames)) == 1 << 20
    frames.close()  # closes the socket
    assert closed.wait(10)


def test_plain_tcp_and_an_untrusted_certificate_get_nothing(lane: BulkServer, pki: Pki, tmp_path: Path) -> None:
    ticket = lane.tickets.issue(lambda: iter([b"secret data", Trailer(b"")]))
    with socket.create_connection(("127.0.0.1", lane.port), timeout=10) as plain:
        plain.sendall(b"STRATA-BULK/1 " + ticket.encode() + b"\n")
        got = read_until_closed(plain)
    assert b"secret data" not in got
    other = make_pki(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(lane, other.ca)
    # the ticket was not spent by either attempt
    assert fetch(lane, pki.ca, ticket)[0] == b"secret data"


def test_the_lane_follows_a_certificate_rotation(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki.cert, live / "tls.crt")
    shutil.copy(pki.key, live / "tls.key")
    server = BulkServer("127.0.0.1:0", TlsFiles(live / "tls.crt", live / "tls.key"), TicketBook())
    try:
        assert fetch(server, pki.ca, server.tickets.issue(lambda: iter([b"1", Trailer(b"")])))[0] == b"1"
        rotated = make_pki(tmp_path / "rotated")
        shutil.copy(rotated.cert, live / "tls.crt")
        shutil.copy(rotated.key, live / "tls.key")
        ticket = server.tickets.issue(lambda: iter([b"2", Trailer(b"")]))
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(server, pki.ca)  # the old CA no longer matches the served certificate
        assert fetch(server, rotated.ca, ticket)[0] == b"2"
    finally:
        server.stop(1).wait()
