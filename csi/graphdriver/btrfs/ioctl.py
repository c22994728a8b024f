"""The btrfs ioctls the btrfs driver needs, called directly (``ioctl(2)`` through ctypes).

Why our own layer: the PyPI ``btrfsutil`` wheel links against libbtrfsutil 6.10+ and
fails to load on Debian 12 (6.2: undefined symbol); the PyPI ``btrfs`` package
(python-btrfs 15, pure Python) covers tree search, ino lookup and space info, but
not subvolume/snapshot create and destroy, quota enable or qgroup limits. So the few
structures from ``linux/btrfs.h`` and ``linux/btrfs_tree.h`` are packed here with
:mod:`struct`; nothing parses ``btrfs`` command output.

The ioctl wrappers take open file descriptors (a directory fd for names inside it,
or any fd within the filesystem; names must be single path components) and raise :class:`OSError` with the kernel's errno and
the operation in the message; callers translate errnos into strata errors.

Covered: create subvolume (``SUBVOL_CREATE_V2``), snapshot (``SNAP_CREATE_V2``,
read-only or writable), destroy (``SNAP_DESTROY_V2`` by name), subvolume flags
(``SUBVOL_GETFLAGS``), subvolume info (``GET_SUBVOL_INFO``: id, uuid,
parent uuid, flags), the subvolumes of a directory (root-tree search of its ``ROOT_REF``
items), quota (``QUOTA_CTL`` enable, ``QUOTA_RESCAN_WAIT``, quota-tree search for the status,
qgroup usage and limits, one qgroup's or all), ``QGROUP_LIMIT``, and ``statfs(2)``'s
``f_type`` (Python's ``os.statvfs`` lacks it).

Every ioctl is made through ctypes, which releases the GIL for the call:
``fcntl.ioctl`` with a buffer holds it, and a btrfs ioctl may wait for a transaction
commit, which would stall every other thread of the plugin meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

BTRFS_SUPER_MAGIC = 0x9123683E
FIRST_FREE_OBJECTID = 256  # inode number of every subvolume's root directory
SUBVOL_RDONLY = 1 << 1  # in SUBVOL_GETFLAGS/SETFLAGS and snapshot flags
ROOT_SUBVOL_RDONLY = 1 << 0  # the same fact in the root item's flags (GET_SUBVOL_INFO)
QGROUP_LIMIT_MAX_RFER = 1 << 0
QGROUP_LIMIT_MAX_EXCL = 1 << 1
_LIMIT_CLEAR = (1 << 64) - 1  # "no limit" for a field named in the flags

QUOTA_CTL_ENABLE = 1
ROOT_TREE_OBJECTID = 1
QUOTA_TREE_OBJECTID = 8
ROOT_REF_KEY = 156  # in the root tree: (parent subvolume, ROOT_REF, child subvolume) -> btrfs_root_ref + name
QGROUP_STATUS_KEY = 240
QGROUP_INFO_KEY = 242
QGROUP_LIMIT_KEY = 244
QGROUP_STATUS_FLAG_ON = 1 << 0
QGROUP_STATUS_FLAG_RESCAN = 1 << 1
QGROUP_STATUS_FLAG_INCONSISTENT = 1 << 2
QGROUP_STATUS_FLAG_SIMPLE_MODE = 1 << 3

SUBVOL_NAME_MAX = 4039

# Well-known statfs magics, only to name a filesystem in error messages.
FILESYSTEM_NAMES = {
    0x9123683E: "btrfs", 0xEF53: "ext4", 0x58465342: "xfs", 0x01021994: "tmpfs",
    0x794C7630: "overlay", 0x6969: "nfs", 0x2FC12FC1: "zfs", 0xF2F52010: "f2fs",
    0x65735546: "fuse", 0x858458F6: "ramfs",
}


# ------------------------------------------------------------------ ioctl numbers

def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0x94 << 8) | nr


_W, _R = 1, 2
_VOL_ARGS_V2 = struct.Struct("=qQQ32s4040s")  # fd, transid, flags, union{size,inherit}, union{name,subvolid}
_GET_SUBVOL_INFO_SIZE = 504  # sizeof(struct btrfs_ioctl_get_subvol_info_args)
_SEARCH_KEY = struct.Struct("=7Q4I4Q")  # 104 bytes
_SEARCH_HEADER = struct.Struct("=3Q2I")  # transid, objectid, offset, type, len
_SEARCH_ARGS_SIZE = 4096
_QGROUP_LIMIT_ARGS = struct.Struct("=6Q")  # qgroupid, flags, max_rfer, max_excl, rsv_rfer, rsv_excl
_QUOTA_CTL_ARGS = struct.Struct("=2Q")
_ROOT_REF = struct.Struct("<QQH")  # struct btrfs_root_ref: dirid, sequence, name_len (then the name)

IOC_SNAP_CREATE_V2 = _ioc(_W, 23, _VOL_ARGS_V2.size)
IOC_SUBVOL_CREATE_V2 = _ioc(_W, 24, _VOL_ARGS_V2.size)
IOC_SUBVOL_GETFLAGS = _ioc(_R, 25, 8)
IOC_TREE_SEARCH = _ioc(_R | _W, 17, _SEARCH_ARGS_SIZE)
IOC_QUOTA_CTL = _ioc(_R | _W, 40, _QUOTA_CTL_ARGS.size)
IOC_QGROUP_LIMIT = _ioc(_R, 43, _QGROUP_LIMIT_ARGS.size)  # declared _IOR in the uapi header
IOC_QUOTA_RESCAN_WAIT = _ioc(0, 46, 0)
IOC_GET_SUBVOL_INFO = _ioc(_R, 60, _GET_SUBVOL_INFO_SIZE)
IOC_SNAP_DESTROY_V2 = _ioc(_W, 63, _VOL_ARGS_V2.size)


# ------------------------------------------------------------------ values

@dataclass(frozen=True)
class SubvolumeInfo:
    """The fields of ``btrfs_ioctl_get_subvol_info_args`` strata uses."""

    id: int
    parent_id: int  # the subvolume that contains this one
    generation: int
    flags: int  # root item flags (ROOT_SUBVOL_RDONLY ...)
    uuid: bytes
    parent_uuid: bytes  # uuid of the snapshot source; zeros when not a snapshot

    @property
    def readonly(self) -> bool:
        return bool(self.flags & ROOT_SUBVOL_RDONLY)


@dataclass(frozen=True)
class QuotaStatus:
    """The quota tree's status item. ``None`` from :func:`quota_status` means quota is off."""

    flags: int

    @property
    def simple(self) -> bool:
        return bool(self.flags & QGROUP_STATUS_FLAG_SIMPLE_MODE)

    @property
    def rescanning(self) -> bool:
        return bool(self.flags & QGROUP_STATUS_FLAG_RESCAN)

    @property
    def inconsistent(self) -> bool:
        return bool(self.flags & QGROUP_STATUS_FLAG_INCONSISTENT)


@dataclass(frozen=True)
class QgroupUsage:
    """Accounted bytes of a qgroup, as of the last transaction commit."""

    referenced: int
    exclusive: int


@dataclass(frozen=True)
class QgroupLimit:
    """Limits of a qgroup; ``None`` = unlimited."""

    max_referenced: int | None
    max_exclusive: int | None


# ------------------------------------------------------------------ helpers

def _call(fd: int, request: int, buf: bytearray | int, what: str) -> None:
    """One ioctl, without the GIL; a bytearray argument is passed by reference so the
    kernel can fill it, an int by value."""
    if isinstance(buf, bytearray):
        arg: int | None = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) if buf else None
    else:
        arg = buf
    if _libc.ioctl(fd, request, arg) < 0:  # some return a positive value on success (GET_SUBVOL_INFO: 1)
        err = ctypes.get_errno()
        raise OSError(err, f"btrfs {what}: {os.strerror(err)}")


def _name_bytes(name: str) -> bytes:
    raw = os.fsencode(name)
    if not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..") or len(raw) > SUBVOL_NAME_MAX:
        raise OSError(errno.EINVAL, f"btrfs: invalid subvolume name {name!r}")
    return raw


def _vol_args(name: str, *, fd: int = 0, flags: int = 0) -> bytearray:
    return bytearray(_VOL_ARGS_V2.pack(fd, 0, flags, b"", _name_bytes(name)))


def qgroup_id(subvolume_id: int, level: int = 0) -> int:
    """The qgroup id ``level/subvolume_id`` (a subvolume's own qgroup is level 0)."""
    return (level << 48) | subvolume_id


# ------------------------------------------------------------------ filesystem

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def filesystem_magic(path: str | os.PathLike[str]) -> int:
    """``statfs(path).f_type``: which filesystem holds ``path``."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(os.fspath(path)), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {os.fspath(path)}: {os.strerror(err)}")
    magic: int = struct.unpack_from("=q", buf.raw)[0]
    return magic & 0xFFFFFFFF


def is_subvolume_root(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (not followed if a symlink) is the root directory of a btrfs subvolume."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == FIRST_FREE_OBJECTID \
        and filesystem_magic(path) == BTRFS_SUPER_MAGIC


# ------------------------------------------------------------------ subvolumes

def create_subvolume(dir_fd: int, name: str) -> None:
    """Create an empty subvolume ``name`` in the directory ``dir_fd``."""
    _call(dir_fd, IOC_SUBVOL_CREATE_V2, _vol_args(name), f"create subvolume {name}")


def snapshot(source_fd: int, dir_fd: int, name: str, *, readonly: bool) -> None:
    """Snapshot the subvolume open at ``source_fd`` as ``name`` in directory ``dir_fd``.

    The kernel flushes the source's dirty data (delalloc) and commits a transaction
    before it returns, so the snapshot holds everything written before the call; no
    separate ``syncfs`` is needed. The cost does not depend on the data size.
    """
    flags = SUBVOL_RDONLY if readonly else 0
    _call(dir_fd, IOC_SNAP_CREATE_V2, _vol_args(name, fd=source_fd, flags=flags), f"snapshot as {name}")


def destroy_subvolume(dir_fd: int, name: str) -> None:
    """Delete the subvolume ``name`` in ``dir_fd`` (read-only ones too, as root).

    The name goes at once; the kernel's cleaner frees the extents afterwards.
    """
    _call(dir_fd, IOC_SNAP_DESTROY_V2, _vol_args(name), f"destroy subvolume {name}")


def get_flags(fd: int) -> int:
    buf = bytearray(8)
    _call(fd, IOC_SUBVOL_GETFLAGS, buf, "get subvolume flags")
    flags: int = struct.unpack("=Q", buf)[0]
    return flags


def subvolume_info(fd: int) -> SubvolumeInfo:
    """Facts about the subvolume that ``fd`` lies in."""
    buf = bytearray(_GET_SUBVOL_INFO_SIZE)
    _call(fd, IOC_GET_SUBVOL_INFO, buf, "get subvolume info")
    treeid, = struct.unpack_from("=Q", buf, 0)
    parent_id, _dirid, generation, flags = struct.unpack_from("=4Q", buf, 264)
    return SubvolumeInfo(
        id=treeid, parent_id=parent_id, generation=generation, flags=flags,
        uuid=bytes(buf[296:312]), parent_uuid=bytes(buf[312:328]),
    )


# ------------------------------------------------------------------ quota

def _search(fd: int, tree_id: int, item_type: int, min_offset: int, max_offset: int,
            objectid: int = 0) -> Iterator[tuple[int, bytes]]:
    """Items (offset, payload) of ``item_type`` with ``objectid`` in ``tree_id``, in key order."""
    offset = min_offset
    while True:
        key = _SEARCH_KEY.pack(tree_id, objectid, objectid, offset, max_offset, 0, (1 << 64) - 1,
                               item_type, item_type, 4096, 0, 0, 0, 0, 0)
        buf = bytearray(_SEARCH_ARGS_SIZE)
        buf[: len(key)] = key
        _call(fd, IOC_TREE_SEARCH, buf, "tree search")
        count = struct.unpack_from("=I", buf, 64)[0]  # key.nr_items
        if count == 0:
            return
        pos, last = _SEARCH_KEY.size, offset
        for _ in range(count):
            _transid, item_objectid, item_offset, typ, length = _SEARCH_HEADER.unpack_from(buf, pos)
            pos += _SEARCH_HEADER.size
            if item_objectid == objectid and typ == item_type:
                yield item_offset, bytes(buf[pos: pos + length])
            pos += length
            last = item_offset
        if last >= max_offset:
            return
        offset = last + 1


def subvolumes_in(dir_fd: int) -> dict[str, int]:
    """The subvolumes whose root is an entry of the directory open at ``dir_fd``: name -> subvolume
    id, from one search of the root tree (its ``ROOT_REF`` items) instead of an open and a
    ``GET_SUBVOL_INFO`` per entry."""
    parent = subvolume_info(dir_fd).id
    dirid = os.fstat(dir_fd).st_ino
    found = {}
    for child, payload in _search(dir_fd, ROOT_TREE_OBJECTID, ROOT_REF_KEY, 0, (1 << 64) - 1, objectid=parent):
        ref_dirid, _sequence, name_len = _ROOT_REF.unpack_from(payload)
        if ref_dirid == dirid:
            found[os.fsdecode(payload[_ROOT_REF.size: _ROOT_REF.size + name_len])] = child
    return found


def quota_status(fd: int) -> QuotaStatus | None:
    """The quota status of the filesystem holding ``fd``; None when quota is disabled."""
    try:
        for _offset, payload in _search(fd, QUOTA_TREE_OBJECTID, QGROUP_STATUS_KEY, 0, 0):
            return QuotaStatus(flags=struct.unpack_from("=3Q", payload)[2])
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # no quota tree
            return None
        raise
    return None


def quota_enable(fd: int) -> None:
    """Enable (full) qgroup accounting; the kernel starts a rescan of existing data."""
    _call(fd, IOC_QUOTA_CTL, bytearray(_QUOTA_CTL_ARGS.pack(QUOTA_CTL_ENABLE, 0)), "enable quota")


def quota_rescan_wait(fd: int) -> None:
    """Block until a running quota rescan has finished (returns at once if none)."""
    _call(fd, IOC_QUOTA_RESCAN_WAIT, 0, "wait for quota rescan")


def qgroup_usage(fd: int, qgroupid: int) -> QgroupUsage | None:
    """Referenced/exclusive bytes of ``qgroupid``; None if it has no info item."""
    for _offset, payload in _search(fd, QUOTA_TREE_OBJECTID, QGROUP_INFO_KEY, qgroupid, qgroupid):
        _gen, rfer, _rc, excl, _ec = struct.unpack_from("=5Q", payload)
        return QgroupUsage(referenced=rfer, exclusive=excl)
    return None


def _limit(payload: bytes) -> QgroupLimit:
    flags, max_rfer, max_excl, _rr, _re = struct.unpack_from("=5Q", payload)
    return QgroupLimit(
        max_referenced=max_rfer if flags & QGROUP_LIMIT_MAX_RFER else None,
        max_exclusive=max_excl if flags & QGROUP_LIMIT_MAX_EXCL else None,
    )


def qgroup_limit(fd: int, qgroupid: int) -> QgroupLimit | None:
    """The limits recorded for ``qgroupid``; None if it has no limit item."""
    for _offset, payload in _search(fd, QUOTA_TREE_OBJECTID, QGROUP_LIMIT_KEY, qgroupid, qgroupid):
        return _limit(payload)
    return None


def qgroup_limits(fd: int) -> dict[int, QgroupLimit]:
    """Every limit item of the filesystem holding ``fd``: qgroup id -> limits (one search)."""
    return {qgroupid: _limit(payload)
            for qgroupid, payload in _search(fd, QUOTA_TREE_OBJECTID, QGROUP_LIMIT_KEY, 0, (1 << 64) - 1)}


def set_qgroup_limit(fd: int, qgroupid: int, *, max_referenced: int | None) -> None:
    """Limit the referenced bytes of ``qgroupid`` (None removes the limit)."""
    value = _LIMIT_CLEAR if max_referenced is None else max_referenced
    args = _QGROUP_LIMIT_ARGS.pack(qgroupid, QGROUP_LIMIT_MAX_RFER, value, 0, 0, 0)
    _call(fd, IOC_QGROUP_LIMIT, bytearray(args), f"limit qgroup 0/{qgroupid & ((1 << 48) - 1)}")


COMPRESSION_XATTR = "btrfs.compression"  # what ``btrfs property set PATH compression X`` writes


def set_compression(path: str | os.PathLike[str], algorithm: str) -> None:
    """Set the compression property of the inode at ``path`` (a subvolume root: inherited by
    files and directories created in it afterwards). ``none`` stops compression; ``""``
    returns to the filesystem's mount option."""
    os.setxattr(path, COMPRESSION_XATTR, algorithm.encode(), follow_symlinks=False)


def get_compression(path: str | os.PathLike[str]) -> str:
    """The compression property of the inode at ``path`` ("" when unset)."""
    try:
        return os.getxattr(path, COMPRESSION_XATTR, follow_symlinks=False).decode()
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return ""
        raise
