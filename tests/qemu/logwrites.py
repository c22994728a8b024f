"""Read and replay a dm-log-writes write log (the power-cut lane's volatile-cache model).

The log is written by qemu's ``blklogwrites`` block driver, which records every write the
guest's virtual disk receives in the on-disk format of the kernel's dm-log-writes target
(kernel ``Documentation/admin-guide/device-mapper/log-writes.rst``, ``drivers/md/dm-log-writes.c``)::

    sector 0            super:  le64 magic 0x6a736677736872, le64 version 1,
                                le64 nr_entries, le32 sectorsize
    then nr_entries x   entry:  le64 sector, le64 nr_sectors, le64 flags, le64 data_len
                                (one whole log sector), followed by nr_sectors sectors of
                                data (none for a discard or a flush)

``sector``/``nr_sectors`` count ``sectorsize`` units. Flags: FLUSH 1, FUA 2, DISCARD 4,
MARK 8 (``data_len`` bytes of mark text follow the entry in its sector), METADATA 16.
qemu writes the entry and data before it completes the guest's request and rewrites the
super (and flushes the log file) on every flush, so once the guest saw a flush complete
the log holds every write before it. Entries written after the last super update are
found by scanning on while headers are plausible (the log file starts as zeros).

:func:`replay` applies entries to a copy of the disk as it was when logging began: all
entries up to the last flush (what a disk with a volatile write cache must keep), and,
in ``reorder`` mode, a random subset of the writes after it (what such a cache may
have written out of order before the power went).
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA
_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")


class LogError(ValueError):
    """The file is not a write log this module can read."""


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int  # in log sectors
    nr_sectors: int
    flags: int
    data_offset: int  # byte offset of the data in the log file
    mark: str = ""

    @property
    def is_write(self) -> bool:
        return self.nr_sectors > 0 and not self.flags & (DISCARD | MARK)

    @property
    def is_barrier(self) -> bool:
        """A flush (or FUA write): everything logged before it is on stable storage."""
        return bool(self.flags & (FLUSH | FUA))


@dataclass(frozen=True)
class WriteLog:
    path: Path
    sectorsize: int
    nr_entries: int  # as the super says
    entries: tuple[Entry, ...]  # the super's entries and the plausible ones after them

    @property
    def last_barrier(self) -> int:
        """Index of the last flush/FUA entry, -1 if none."""
        for entry in reversed(self.entries):
            if entry.is_barrier:
                return entry.index
        return -1


def read_log(path: Path, disk_sectors: int | None = None) -> WriteLog:
    """Parse ``path``. ``disk_sectors`` (the logged disk's size in log sectors) bounds the
    plausibility check of entries beyond the super's count."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic, version, nr_entries, sectorsize = _SUPER.unpack(f.read(_SUPER.size))
        if magic != MAGIC or version != VERSION:
            raise LogError(f"{path}: no dm-log-writes super (magic {magic:#x}, version {version})")
        if sectorsize < 512 or sectorsize & (sectorsize - 1):
            raise LogError(f"{path}: bad sector size {sectorsize}")
        entries: list[Entry] = []
        offset = sectorsize
        index = 0
        while offset + sectorsize <= size:
            f.seek(offset)
            raw = f.read(sectorsize)
            sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(raw)
            beyond = index >= nr_entries
            plausible = (not flags & ~KNOWN_FLAGS and (nr_sectors > 0 or flags & (FLUSH | MARK | DISCARD))
                         and (disk_sectors is None or sector + nr_sectors <= disk_sectors)
                         and data_len <= sectorsize - _ENTRY.size)
            if not plausible:
                if beyond:
                    break
                raise LogError(f"{path}: entry {index} at byte {offset} is malformed")
            data_sectors = 0 if flags & (DISCARD | MARK) else nr_sectors
            end = offset + sectorsize * (1 + data_sectors)
            if end > size:
                if beyond:
                    break  # cut short
                raise LogError(f"{path}: entry {index} runs past the end of the log")
            mark = raw[_ENTRY.size:_ENTRY.size + data_len].decode(errors="replace") if flags & MARK else ""
            entries.append(Entry(index, sector, nr_sectors, flags, offset + sectorsize, mark))
            offset = end
            index += 1
    if len(entries) < nr_entries:
        raise LogError(f"{path}: super names {nr_entries} entries, found {len(entries)}")
    return WriteLog(path, sectorsize, nr_entries, tuple(entries))


def iter_data(log: WriteLog, entry: Entry, chunk: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
    """(disk byte offset, bytes) pieces of a write entry's data."""
    total = entry.nr_sectors * log.sectorsize
    with open(log.path, "rb") as f:
        done = 0
        while done < total:
            n = min(chunk, total - done)
            f.seek(entry.data_offset + done)
            data = f.read(n)
            if len(data) != n:
                raise LogError(f"{log.path}: entry {entry.index} data cut short")
            yield entry.sector * log.sectorsize + done, data
            done += n


@dataclass(frozen=True)
class ReplayResult:
    entries: int  # entries in the log
    barrier: int  # index of the last flush/FUA
    applied: int  # write/discard entries applied
    dropped: int  # write/discard entries after the last flush not applied


def replay(log: WriteLog, disk: Path, *, mode: str = "flush", rng: random.Random | None = None) -> ReplayResult:
    """Apply ``log`` to ``disk`` (the image as it was when logging began).

    ``mode`` ``flush``: entries up to and including the last flush/FUA only.
    ``reorder``: those, then each later write with probability 1/2, in log order
    (a later write may land without an earlier one, as a volatile cache may reorder).
    Discards are applied as zeros (what the host's hole punching returns)."""
    if mode not in ("flush", "reorder"):
        raise ValueError(f"unknown replay mode {mode!r}")
    rng = rng or random.Random(0)
    barrier = log.last_barrier
    applied = dropped = 0
    fd = os.open(disk, os.O_WRONLY)
    try:
        for entry in log.entries:
            if not (entry.is_write or entry.flags & DISCARD):
                continue
            if entry.index > barrier and (mode == "flush" or rng.random() < 0.5):
                dropped += 1
                continue
            if entry.flags & DISCARD:
                zeros = bytes(min(entry.nr_sectors * log.sectorsize, 4 << 20))
                start, left = entry.sector * log.sectorsize, entry.nr_sectors * log.sectorsize
                while left:
                    n = min(left, len(zeros))
                    os.pwrite(fd, zeros[:n], start)
                    start, left = start + n, left - n
            else:
                for offset, data in iter_data(log, entry):
                    os.pwrite(fd, data, offset)
            applied += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return ReplayResult(len(log.entries), barrier, applied, dropped)


def write_log(path: Path, records: list[tuple[int, bytes, int]], sectorsize: int = 512,
              nr_entries: int | None = None) -> None:
    """Write a log of (sector, data, flags) records (tests of this module)."""
    with open(path, "wb") as f:
        count = len(records) if nr_entries is None else nr_entries
        f.write(_SUPER.pack(MAGIC, VERSION, count, sectorsize).ljust(sectorsize, b"\0"))
        for sector, data, flags in records:
            nr = len(data) // sectorsize if data else 0
            f.write(_ENTRY.pack(sector, nr, flags, 0).ljust(sectorsize, b"\0"))
            f.write(data)
