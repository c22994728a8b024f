"""Equal content without reading it: two files on one btrfs filesystem whose extent maps are
identical share their data.

:func:`shares_extents` compares the FIEMAP maps (``FS_IOC_FIEMAP``: logical offset, physical
address, length, flags of every extent) of two files. It answers True only when every extent
of both is a plain, located, uncompressed, non-inline one and the maps are equal: the same
bytes on disk at the same file offsets. That is only a proof of equal content on a
copy-on-write filesystem, where a shared extent is never overwritten in place — so the naive
differ asks it only for two trees of the same btrfs filesystem (:func:`same_btrfs`), where
snapshots and reflinked copies share extents. (On ext4 or XFS under devicemapper two thin
snapshots keep the same block numbers while one is overwritten in place; there the files are
compared byte for byte.) Any error, or any extent flagged unknown, delayed, encoded (compressed:
the physical address does not say where inside the extent a file's data starts), inline,
tail-packed, unaligned or encrypted, answers False and the caller reads the data.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from csi.host.fsinfo import mount_of

FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQI12x")  # fe_logical, fe_physical, fe_length, reserved64[2], fe_flags, reserved[3]
_BATCH = 256
_LAST = 0x1
_UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400  # unknown delalloc encoded encrypted unaligned inline tail
_SHARED = 0x2000  # FIEMAP_EXTENT_SHARED: not part of the comparison
_MAX = 2**64 - 1


def same_btrfs(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` lie on one mounted btrfs filesystem (same source device)."""
    ma, mb = mount_of(a), mount_of(b)
    return ma is not None and mb is not None and ma.fstype == mb.fstype == "btrfs" and ma.source == mb.source


def extent_map(path: str | os.PathLike[str]) -> list[tuple[int, int, int, int]] | None:
    """``[(logical, physical, length, flags)]`` of ``path``, or None when it cannot be trusted."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            buf = bytearray(_HEADER.pack(start, _MAX - start, 0, 0, _BATCH, 0) + bytes(_EXTENT.size * _BATCH))
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            except OSError:
                return None
            mapped = _HEADER.unpack_from(buf)[3]
            if mapped == 0:
                return out
            last = False
            for i in range(mapped):
                logical, physical, length, _, _, flags = _EXTENT.unpack_from(buf, _HEADER.size + i * _EXTENT.size)
                if flags & _UNTRUSTED:
                    return None
                out.append((logical, physical, length, flags & ~_SHARED))
                last = bool(flags & _LAST)
                start = logical + length
            if last:
                return out
    finally:
        os.close(fd)


def shares_extents(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` (regular files of equal size, on one btrfs) have identical
    extent maps: their content is the same (see the module docstring)."""
    map_a = extent_map(a)
    return map_a is not None and map_a == extent_map(b)
