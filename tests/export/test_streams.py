"""The stream pieces of a transfer, without a server: a producer running ahead of its consumer
(csi.services.readahead), the ExportDiff client reader (csi.services.exportclient) over a
scripted stub, and a verifying reader that trusts the hash of the stream below it
(csi.backup.target)."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from csi.backup.target import VerifyingReader
from csi.errors import DigestMismatch
from csi.proto import export_pb2 as pb
from csi.services.exportclient import ExportDiffReader
from csi.services.readahead import read_ahead


def test_read_ahead_keeps_order_and_runs_ahead() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(10):
            made.append(i)
            yield i

    out = read_ahead(items(), 3, "t-order")
    assert next(out) == 0
    deadline = time.monotonic() + 5
    while len(made) < 4 and time.monotonic() < deadline:  # 1 handed out + 3 queued
        time.sleep(0.01)
    assert len(made) >= 4
    assert list(out) == list(range(1, 10))


def test_read_ahead_raises_the_producers_error_after_its_items() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise DigestMismatch("bad")

    out = read_ahead(items(), 8, "t-error")
    assert next(out) == 1 and next(out) == 2
    with pytest.raises(DigestMismatch):
        next(out)


def test_closing_stops_the_producer_and_calls_on_stop() -> None:
    stopped = threading.Event()

    def items() -> Iterator[int]:
        i = 0
        while True:
            i += 1
            yield i

    out = read_ahead(items(), 2, "t-close", on_stop=stopped.set)
    assert next(out) == 1
    out.close()  # type: ignore[attr-defined]
    assert stopped.is_set()
    assert not [t for t in threading.enumerate() if t.name == "t-close"]


class _Call:
    """A scripted ExportDiff response stream."""

    def __init__(self, messages: list[pb.ExportDiffResponse], fail: grpc.RpcError | None = None) -> None:
        self._messages, self._fail, self.cancelled = iter(messages), fail, False

    def __iter__(self) -> _Call:
        return self

    def __next__(self) -> pb.ExportDiffResponse:
        try:
            return next(self._messages)
        except StopIteration:
            if self._fail is not None:
                raise self._fail from None
            raise

    def cancel(self) -> None:
        self.cancelled = True


class _Stub:
    def __init__(self, *calls: _Call) -> None:
        self.calls, self.requests = list(calls), []

    def ExportDiff(self, request: pb.ExportDiffRequest) -> _Call:  # noqa: N802
        self.requests.append(request)
        return self.calls.pop(0)


def _stream(data: bytes, chunk: int, digest: str | None = None) -> list[pb.ExportDiffResponse]:
    out = [pb.ExportDiffResponse(data=data[i:i + chunk], offset=i) for i in range(0, len(data), chunk)]
    digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
    out.append(pb.ExportDiffResponse(offset=len(data), summary=pb.ExportSummary(digest=digest, size=len(data))))
    return out


class _Broken(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"


def test_reader_gives_every_byte_in_any_read_size_and_its_digest() -> None:
    data = bytes(range(256)) * 1000
    reader = ExportDiffReader(_Stub(_Call(_stream(data, 7000))), "snap", "")  # type: ignore[arg-type]
    got = bytearray()
    sizes = iter([1, 512, 100_000, 3, 7000, 65536] * 100)
    while True:
        buf = bytearray(next(sizes))
        n = reader.readinto(buf)
        if not n:
            break
        got += buf[:n]
        more = reader.read(next(sizes))
        got += more
    assert bytes(got) == data
    assert reader.digest() == "sha256:" + hashlib.sha256(data).hexdigest() and reader.count == len(data)
    reader.close()


def test_a_wrong_summary_is_never_a_clean_end() -> None:
    data = b"x" * 5000
    reader = ExportDiffReader(_Stub(_Call(_stream(data, 1000, "sha256:" + "0" * 64))), "snap", "")  # type: ignore[arg-type]
    got = b""
    with pytest.raises(DigestMismatch):
        while chunk := reader.read(700):
            got += chunk
    assert got == data  # the data arrives; its end does not
    with pytest.raises(DigestMismatch):  # nor on a second try
        reader.read(700)
    reader.close()


def test_a_broken_stream_resumes_at_the_byte_it_stopped() -> None:
    data = bytes(range(256)) * 64
    whole = _stream(data, 4096)
    stub = _Stub(_Call(whole[:2], _Broken()), _Call([m for m in whole if m.offset >= 8192]))
    reader = ExportDiffReader(stub, "snap", "")  # type: ignore[arg-type]
    got = b""
    while chunk := reader.read(-1):
        got += chunk
    assert got == data
    assert [r.starting_offset for r in stub.requests] == [0, 8192]


def test_closing_early_cancels_the_stream() -> None:
    call = _Call(_stream(b"y" * 100_000, 1000))
    reader = ExportDiffReader(_Stub(call), "snap", "")  # type: ignore[arg-type]
    assert reader.read(10) == b"y" * 10
    reader.close()
    assert call.cancelled


def test_verifying_reader_trusts_a_hashing_stream_below_it() -> None:
    data = b"layer" * 1000
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    below = ExportDiffReader(_Stub(_Call(_stream(data, 999))), "snap", "")  # type: ignore[arg-type]
    reader = VerifyingReader(below, good, len(data), "layer", hashed=True)  # type: ignore[arg-type]
    buf = bytearray(4096)
    total = 0
    while n := reader.readinto(buf):
        total += n
    assert total == len(data) and reader.verified
    below = ExportDiffReader(_Stub(_Call(_stream(data, 999))), "snap", "")  # type: ignore[arg-type]
    wrong = VerifyingReader(below, "sha256:" + "1" * 64, len(data), "layer", hashed=True)  # type: ignore[arg-type]
    with pytest.raises(DigestMismatch):
        wrong.finish()
    plain = VerifyingReader(io.BytesIO(data), good, len(data), "layer")  # type: ignore[arg-type]
    plain.finish()
    assert plain.verified
