"""Splitting one layer diff into several OCI layers, for registries that limit a layer's size.

:func:`plan_parts` reads a diff (an OCI layer tar, as the codec writes it) once, without
keeping file data, and cuts it into parts of at most ``max_bytes`` (uncompressed tar bytes);
:func:`part_streams` reads the same diff again (a diff's bytes are deterministic) and yields
one tar stream per part, each a complete layer tar. Applying the parts in order, each on the
previous, gives the tree the whole diff gives; so does ``umoci unpack``. Rules:

* Cuts fall on member boundaries (a member's PAX/GNU extension headers stay with it); a file
  is never split, so a part holding one file larger than the limit is larger than the limit.
* Every whiteout and opaque marker goes at the start of the **first** part: they hide what
  the lower layers hold, and in a later part they would also hide what earlier parts of the
  same diff added (OCI: a whiteout applies to every layer below it).
* A hard-link member stays in the part of the member it links to: a cut never falls between
  the first path of an inode and its last link. When a link group is spread over more than
  ``max_bytes`` of the stream, that part is larger than the limit (:attr:`Part.oversized`
  says why).
* A later part starts with the entries (headers only) of the diff's directories that contain
  its members, emitted in earlier parts: unpackers change a directory's mtime when a child
  is added, and the repeated entry sets it back (applier: at the end of the part; umoci: after
  each entry).

Each part ends as the codec ends a tar (two zero blocks, zeros to a 10 KiB record).
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from csi.errors import InvalidArgument, StrataError
from csi.graphdriver.diff.whiteouts import MemberKind, classify

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
               tarfile.SOLARIS_XHDTYPE)
_WITH_DATA = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_CHUNK = 1 << 20


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _end_bytes(written: int) -> bytes:
    end = 2 * BLOCK
    return bytes(end + (-(written + end) % RECORD))


def _total(size: int) -> int:
    """A part's tar bytes once it is ended."""
    return size + len(_end_bytes(size))


@dataclass
class Unit:
    """One member of the diff as it lies in the stream: extension headers, header, data."""

    offset: int
    length: int
    name: str  # normalised path ("" for the root)
    kind: MemberKind
    is_dir: bool
    link: str | None  # hard-link target (normalised)
    check: int  # crc32 of the first block: the second read must find the same member there
    raw: bytes | None = None  # kept for markers and directories (headers only)
    part: int = 0


@dataclass
class Part:
    units: list[Unit] = field(default_factory=list)
    prefix: list[bytes] = field(default_factory=list)  # markers (part 0) or repeated directory entries
    size: int = 0  # tar bytes, end blocks included
    oversized: str = ""  # why the part is larger than the limit, if it is


class _Reader:
    """Exact reads from a stream, counting the offset."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.offset = raw, 0

    def read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            data = self.raw.read(min(left, _CHUNK))
            if not data:
                break
            parts.append(data)
            left -= len(data)
        self.offset += n - left
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n:
            data = self.raw.read(min(n, _CHUNK))
            if not data:
                raise InvalidArgument("layer tar ends inside a member")
            n -= len(data)
            self.offset += len(data)


def _number(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:  # base-256
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length_text, _, _ = data[pos:pos + 20].partition(b" ")
        length = int(length_text)
        key, _, value = data[pos + len(length_text) + 1:pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _name(block: bytes) -> bytes:
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] in (b"ustar\x00", b"ustar "):
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name


def scan(raw: IO[bytes]) -> Iterator[Unit]:
    """The members of a layer tar, in stream order (see :class:`Unit`)."""
    reader = _Reader(raw)
    while True:
        start = reader.offset
        head = b""
        pax: dict[bytes, bytes] = {}
        long_name = long_link = None
        while True:
            block = reader.read(BLOCK)
            if len(block) < BLOCK:
                raise InvalidArgument("layer tar ends without its end-of-archive blocks")
            if block == bytes(BLOCK):
                return
            kind = block[156:157]
            size = _number(block[124:136])
            if kind not in _EXTENSIONS:
                break
            data = reader.read(_padded(size))
            head += block + data
            if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                pax.update(_pax(data[:size]))
            elif kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data[:size].rstrip(b"\0")
            elif kind == tarfile.GNUTYPE_LONGLINK:
                long_link = data[:size].rstrip(b"\0")
        if b"size" in pax:
            size = int(pax[b"size"])
        name_bytes = pax.get(b"GNU.sparse.name") or pax.get(b"path") or long_name or _name(block)
        link_bytes = pax.get(b"linkpath") or long_link or block[157:257].split(b"\0", 1)[0]
        data_len = _padded(size) if kind in _WITH_DATA else 0
        name = name_bytes.decode("utf-8", "surrogateescape")
        meaning = classify(name)
        is_dir = kind == tarfile.DIRTYPE
        link = classify(link_bytes.decode("utf-8", "surrogateescape")).path if kind == tarfile.LNKTYPE else None
        keep = meaning.kind is not MemberKind.ENTRY or is_dir  # headers only: kept to be emitted again
        reader.skip(data_len)
        yield Unit(start, len(head) + BLOCK + data_len, meaning.path, meaning.kind, is_dir, link,
                   zlib.crc32((head + block)[:BLOCK]), head + block if keep else None)


def _ancestors(name: str) -> Iterator[str]:
    yield ""
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def plan_parts(raw: IO[bytes], max_bytes: int) -> list[Part]:
    """Read the diff ``raw`` once and cut it (see the module docstring)."""
    if max_bytes < 4 * BLOCK:
        raise InvalidArgument(f"a layer limit of {max_bytes} bytes cannot hold a tar member")
    units = list(scan(raw))
    markers = [u for u in units if u.kind is not MemberKind.ENTRY]
    entries = [u for u in units if u.kind is MemberKind.ENTRY]
    first_of = {}
    for i, u in enumerate(entries):
        first_of.setdefault(u.name, i)
    span_end = list(range(len(entries)))  # a cut after i is allowed when no link group is open
    for i, u in enumerate(entries):
        if u.link is not None and u.link in first_of:
            target = first_of[u.link]
            span_end[target] = max(span_end[target], i)
    dirs = {u.name: u for u in entries if u.is_dir}
    parts = [Part(prefix=[m.raw or b"" for m in markers])]
    parts[0].size = sum(len(m.raw or b"") for m in markers)
    open_until = -1
    for i, u in enumerate(entries):
        part = parts[-1]
        extra = [a for a in _ancestors(u.name) if a in dirs and dirs[a].part < len(parts) - 1
                 and dirs[a].raw not in part.prefix] if len(parts) > 1 else []
        cost = u.length + sum(len(dirs[a].raw or b"") for a in extra)
        if part.units and open_until < i and _total(part.size + cost) > max_bytes:
            part = Part()
            parts.append(part)
            extra = [a for a in _ancestors(u.name) if a in dirs and dirs[a].part < len(parts) - 1]
            cost = u.length + sum(len(dirs[a].raw or b"") for a in extra)
        for a in extra:
            part.prefix.append(dirs[a].raw or b"")
        u.part = len(parts) - 1
        part.units.append(u)
        part.size += cost
        if _total(part.size) > max_bytes and not part.oversized:
            part.oversized = (f"a hard-link group spans {u.name!r}" if open_until >= i
                              else f"member {u.name!r} alone is {u.length} bytes")
        open_until = max(open_until, span_end[i])
    for part in parts:
        part.size += len(_end_bytes(part.size))
    return parts


class _PartStream:
    """One part as a readable stream: its prefix, its members copied from the diff, the end."""

    def __init__(self, reader: _Reader, part: Part, index: int) -> None:
        self._reader, self._part, self._index = reader, part, index
        self._pending = list(reversed(part.prefix))
        self._units = list(reversed(part.units))
        self._buffer = b""
        self._left = 0  # bytes of the current unit still to copy
        self._written = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        if self._pending:
            return self._pending.pop()
        if self._left:
            data = self._reader.read(min(self._left, _CHUNK))
            if not data:
                raise StrataError("the diff ended early while it was split into layers")
            self._left -= len(data)
            return data
        if self._units:
            unit = self._units.pop()
            self._skip_to(unit.offset)
            first = self._reader.read(BLOCK)
            if zlib.crc32(first) != unit.check:
                raise StrataError(f"the diff changed between its two reads (at {unit.name!r}): it is not deterministic")
            self._left = unit.length - BLOCK
            return first
        if not self._ended:
            self._ended = True
            return _end_bytes(self._written)
        return b""

    def _skip_to(self, offset: int) -> None:
        """Pass over markers (already in the first part) up to the next member of this part."""
        if offset < self._reader.offset:
            raise StrataError("parts of a split diff must be read in order")
        self._reader.skip(offset - self._reader.offset)

    def read(self, n: int = -1) -> bytes:
        want = _CHUNK if n is None or n < 0 else n
        while len(self._buffer) < want:
            chunk = self._next_chunk()
            if not chunk:
                break
            self._written += len(chunk)
            self._buffer += chunk
        out, self._buffer = self._buffer[:want], self._buffer[want:]
        return out

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        return None


def part_streams(raw: IO[bytes], parts: list[Part]) -> Iterator[IO[bytes]]:
    """The parts of ``raw`` (a second read of the planned diff), to be consumed in order."""
    reader = _Reader(raw)
    for index, part in enumerate(parts):
        yield _PartStream(reader, part, index)  # type: ignore[misc]
