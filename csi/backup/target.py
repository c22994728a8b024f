"""What a backup is written to and restored from: the :class:`Target` interface, digest
verification of what is read back (:func:`csi.backup.targets.open_target` opens one for a
parsed reference).

A target stores content-addressed blobs and manifests of *one* repository (a registry
repository, or an OCI image layout directory):

    has_blob(digest) -> bool
    mount_blob(digest, from_locations) -> bool    make an existing blob of another repository
                                                      of the same registry ours (no data moves)
    put_blob(stream, expected=None) -> (digest, size) stream a blob in; the digest is computed
                                                      while it streams; with ``expected`` a
                                                      mismatch stores nothing and raises
    put_manifest(data, tag) -> digest                 by digest always, and under ``tag`` if given
    get_manifest(tag_or_digest) -> (bytes, digest)    verified when asked by digest
    open_blob(digest, size) -> IO[bytes]              a stream that raises DigestMismatch at its
                                                      end if the bytes are not the blob's
    delete(tag_or_digest)                             remove a tag (or a manifest by digest)

Errors (:mod:`csi.errors`): a missing manifest or blob is NotFound; a refused credential is
Unauthenticated (fix the Secret); a server or network failure is Unavailable (retry);
content whose digest does not match is DigestMismatch (the source is corrupt).
"""

from __future__ import annotations

import hashlib
from typing import IO, Protocol

from csi.backup.media import check_digest
from csi.errors import DigestMismatch


class Target(Protocol):
    """See the module docstring."""

    def has_blob(self, digest: str) -> bool: ...

    def mount_blob(self, digest: str, from_locations: list[str]) -> bool: ...

    def put_blob(self, stream: IO[bytes], expected: str | None = None) -> tuple[str, int]: ...

    def put_manifest(self, data: bytes, tag: str | None) -> str: ...

    def get_manifest(self, tag_or_digest: str) -> tuple[bytes, str]: ...

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]: ...

    def delete(self, tag_or_digest: str) -> None: ...

    def location(self) -> str: ...

    def close(self) -> None: ...


class HashedStream(Protocol):
    """A stream that hashes (sha256) and counts every byte read through it."""

    count: int

    def read(self, n: int = -1) -> bytes: ...

    def digest(self) -> str: ...


class VerifyingReader:
    """Reads ``raw`` and checks, when it ends, that the bytes hash to ``digest`` (and number
    ``size``); raises :class:`DigestMismatch` instead of returning the last (empty) read.
    A consumer therefore never sees a clean end of stream for corrupt content.

    ``hashed``: ``raw`` is a :class:`HashedStream` that already hashes what it yields (e.g.
    a chunk stream checking its own summary); its digest is compared, so the bytes are
    hashed once, not twice."""

    def __init__(self, raw: IO[bytes], digest: str, size: int | None, what: str, *, hashed: bool = False) -> None:
        self._raw = raw
        self._expected = check_digest(digest)
        self._size = size
        self._what = what
        self._hash = None if hashed else hashlib.sha256()
        self.count = 0
        self.verified = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n) if n is not None and n >= 0 else self._raw.read()
        if data:
            self._took(data)
            return data
        if n == 0:
            return data
        self._check()
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        readinto = getattr(self._raw, "readinto", None)
        if readinto is None:
            data = self.read(len(buf))
            buf[: len(data)] = data
            return len(data)
        n = readinto(buf)
        if n:
            self._took(memoryview(buf)[:n])
        elif len(buf):
            self._check()
        return n

    def _took(self, data: bytes | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self.count += len(data)
        if self._size is not None and self.count > self._size:
            raise DigestMismatch(f"{self._what} is longer than its descriptor's {self._size} bytes")

    def digest(self) -> str:
        """``sha256:…`` of what was read so far."""
        if self._hash is None:
            return self._raw.digest()  # type: ignore[attr-defined]
        return "sha256:" + self._hash.hexdigest()

    def _check(self) -> None:
        if self.verified:
            return
        actual = self.digest()
        if self._size is not None and self.count != self._size:
            raise DigestMismatch(f"{self._what}: got {self.count} bytes, its descriptor says {self._size}")
        if actual != self._expected:
            raise DigestMismatch(f"{self._what}: content hashes to {actual}, expected {self._expected}")
        self.verified = True

    def finish(self) -> None:
        """Read what is left and verify (a consumer may stop before the end, e.g. tar padding)."""
        while self.read(1 << 20):
            pass
        self._check()

    def close(self) -> None:
        self._raw.close()
