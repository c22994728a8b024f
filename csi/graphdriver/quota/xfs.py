"""XFS project quota: a size limit per writable layer directory (overlay, aufs, vfs homes).

When a driver home lives on XFS mounted with ``prjquota`` (``pquota``), every writable
layer's directory gets a project ID of its own with a hard block limit, so writes past
the layer's size fail with ENOSPC (root included; also through an overlay upper dir that
lives inside the directory, because new inodes inherit the project).

Use::

    quota = ProjectQuota.for_home(home)     # None unless home is on XFS with prjquota
    quota.assign(layer_dir, size_bytes)     # new ID (or the dir's current one) + limit
    quota.resize(layer_dir, size_bytes)     # only the limit when the dir carries its ID
    quota.ensure(layer_dir, size_bytes)     # assign unless ID, tag and limit already agree
    quota.adopt(moved_dir)                  # record the ID a renamed dir carries (limit 0)
    quota.usage(layer_dir) -> ProjectUsage
    quota.release(layer_dir)                # limit cleared, ID free again

Kernel interfaces only, no ``xfs_quota`` parsing: ``FS_IOC_FSGETXATTR`` /
``FS_IOC_FSSETXATTR`` put the project ID and ``PROJINHERIT`` on the directory (and on
anything already inside it); ``quotactl_fd(2)`` ``Q_XSETQLIM`` / ``Q_XGETQUOTA`` set and
read the project's limit and usage.

Allocation state (crash-safe): ``<home>/quota-projects.json`` maps each assigned
directory (relative to home) to its project ID; it is written to a temporary file,
fsync'd and renamed, under an exclusive ``flock`` of ``<home>/quota-projects.lock``.
*assign* records the ID first, then sets the limit, then tags the directory;
*release* clears the limit, then forgets the ID. A crash in between leaves a record
whose directory may be gone: :meth:`ProjectQuota.for_home` drops such records and
clears their limits, so no ID leaks and no stale limit survives. IDs start at
``first_id`` (default 100000, clear of the small IDs operators put in /etc/projid).

An ID counts as free only when no record names it *and* the filesystem charges nothing
to it (no inodes, no blocks): files that still carry a released ID (a directory renamed
away before a crash, deleted inodes the kernel has not reclaimed yet) are never charged
to the next directory that gets an ID.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from csi.host import mount as mnt
from csi.errors import InvalidArgument, NoSpace, StrataError
from csi.host.fsinfo import mount_of
from csi.host.atomicfile import write_atomic

STATE_FILE = "quota-projects.json"
LOCK_FILE = "quota-projects.lock"
DEFAULT_FIRST_ID = 100_000
MAX_PROJECT_ID = (1 << 32) - 2

# linux/fs.h
FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
FS_IOC_FSSETXATTR = 0x401C5820  # _IOW('X', 32, struct fsxattr)
FS_XFLAG_PROJINHERIT = 0x200
# linux/quota.h, linux/dqblk_xfs.h
PRJQUOTA = 2
Q_XGETQUOTA = (ord("X") << 8) + 3
Q_XSETQLIM = (ord("X") << 8) + 4
FS_DQUOT_VERSION = 1
FS_PROJ_QUOTA = 2
FS_DQ_BSOFT = 1 << 2
FS_DQ_BHARD = 1 << 3
BASIC_BLOCK = 512
_SYS_QUOTACTL_FD = 443  # x86_64 and the generic table


class QuotaError(StrataError):
    """A quota ioctl or quotactl failed."""


class _FsXattr(ctypes.Structure):
    _fields_ = [
        ("fsx_xflags", ctypes.c_uint32),
        ("fsx_extsize", ctypes.c_uint32),
        ("fsx_nextents", ctypes.c_uint32),
        ("fsx_projid", ctypes.c_uint32),
        ("fsx_cowextsize", ctypes.c_uint32),
        ("fsx_pad", ctypes.c_ubyte * 8),
    ]


class _FsDiskQuota(ctypes.Structure):
    _fields_ = [
        ("d_version", ctypes.c_int8), ("d_flags", ctypes.c_int8), ("d_fieldmask", ctypes.c_uint16),
        ("d_id", ctypes.c_uint32),
        ("d_blk_hardlimit", ctypes.c_uint64), ("d_blk_softlimit", ctypes.c_uint64),
        ("d_ino_hardlimit", ctypes.c_uint64), ("d_ino_softlimit", ctypes.c_uint64),
        ("d_bcount", ctypes.c_uint64), ("d_icount", ctypes.c_uint64),
        ("d_itimer", ctypes.c_int32), ("d_btimer", ctypes.c_int32),
        ("d_iwarns", ctypes.c_uint16), ("d_bwarns", ctypes.c_uint16),
        ("d_itimer_hi", ctypes.c_int8), ("d_btimer_hi", ctypes.c_int8),
        ("d_rtbtimer_hi", ctypes.c_int8), ("d_padding2", ctypes.c_int8),
        ("d_rtb_hardlimit", ctypes.c_uint64), ("d_rtb_softlimit", ctypes.c_uint64),
        ("d_rtbcount", ctypes.c_uint64), ("d_rtbtimer", ctypes.c_int32),
        ("d_rtbwarns", ctypes.c_uint16), ("d_padding3", ctypes.c_int16),
        ("d_padding4", ctypes.c_char * 8),
    ]


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def _ioctl_xattr(fd: int, request: int, attr: _FsXattr) -> None:
    buf = bytearray(bytes(attr))
    try:
        fcntl.ioctl(fd, request, buf, True)
    except OSError as exc:
        raise QuotaError(f"project ioctl failed: {exc.strerror}") from exc
    ctypes.memmove(ctypes.addressof(attr), bytes(buf), ctypes.sizeof(attr))


def get_project(path: Path) -> int:
    """The project ID on ``path``'s inode."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        attr = _FsXattr()
        _ioctl_xattr(fd, FS_IOC_FSGETXATTR, attr)
        return attr.fsx_projid
    finally:
        os.close(fd)


def _set_project_fd(fd: int, project_id: int, inherit: bool) -> None:
    attr = _FsXattr()
    _ioctl_xattr(fd, FS_IOC_FSGETXATTR, attr)
    attr.fsx_projid = project_id
    if inherit:
        attr.fsx_xflags |= FS_XFLAG_PROJINHERIT
    _ioctl_xattr(fd, FS_IOC_FSSETXATTR, attr)


def set_project_tree(root: Path, project_id: int) -> None:
    """Put ``project_id`` on ``root`` and everything below it (dirs inherit it onward)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *filenames]:
            path = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(path)
            if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                continue  # symlinks, devices, whiteouts: no fd to tag, and no data blocks
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                _set_project_fd(fd, project_id, inherit=stat.S_ISDIR(st.st_mode))
            finally:
                os.close(fd)


@dataclass(frozen=True)
class ProjectUsage:
    project_id: int
    used_bytes: int
    limit_bytes: int  # 0 = no limit
    inodes: int = 0  # inodes charged to the project


def _quotactl(home: Path, cmd: int, project_id: int, dq: _FsDiskQuota) -> None:
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ret = _libc().syscall(_SYS_QUOTACTL_FD, ctypes.c_uint(fd), ctypes.c_uint((cmd << 8) | PRJQUOTA),
                              ctypes.c_int(project_id), ctypes.byref(dq))
        if ret != 0:
            err = ctypes.get_errno()
            raise QuotaError(f"quotactl project {project_id} on {home}: {os.strerror(err)} (errno {err})")
    finally:
        os.close(fd)


def set_limit(home: Path, project_id: int, limit_bytes: int) -> None:
    """Hard block limit of a project (0 clears it)."""
    dq = _FsDiskQuota(d_version=FS_DQUOT_VERSION, d_flags=FS_PROJ_QUOTA, d_fieldmask=FS_DQ_BHARD | FS_DQ_BSOFT,
                      d_id=project_id, d_blk_hardlimit=-(-limit_bytes // BASIC_BLOCK), d_blk_softlimit=0)
    _quotactl(home, Q_XSETQLIM, project_id, dq)


def read_usage(home: Path, project_id: int) -> ProjectUsage:
    dq = _FsDiskQuota()
    try:
        _quotactl(home, Q_XGETQUOTA, project_id, dq)
    except QuotaError as exc:
        if "No such file" in str(exc):  # no dquot yet: nothing charged, no limit
            return ProjectUsage(project_id, 0, 0)
        raise
    return ProjectUsage(project_id, dq.d_bcount * BASIC_BLOCK, dq.d_blk_hardlimit * BASIC_BLOCK, dq.d_icount)


def limit_of(size_bytes: int) -> int:
    """The limit in bytes the filesystem keeps for ``size_bytes`` (whole basic blocks)."""
    return -(-size_bytes // BASIC_BLOCK) * BASIC_BLOCK


def prjquota_mount(path: Path) -> mnt.MountPoint | None:
    """The XFS mount holding ``path`` if it enforces project quota, else None."""
    best = mount_of(path)
    if best is None or best.fstype != "xfs":
        return None
    opts = set(best.options) | set(best.super_options)
    return best if opts & {"prjquota", "pquota", "pqnoenforce"} and "pqnoenforce" not in opts else None


class ProjectQuota:
    """Project IDs and limits for the directories under one driver home."""

    def __init__(self, home: Path, first_id: int = DEFAULT_FIRST_ID) -> None:
        self.home = Path(home)
        self.first_id = first_id
        with self._state() as projects:
            for rel, pid in list(projects.items()):
                if not (self.home / rel).is_dir():  # crash during release, or dir removed under us
                    set_limit(self.home, pid, 0)
                    del projects[rel]

    @classmethod
    def for_home(cls, home: str | os.PathLike[str], first_id: int = DEFAULT_FIRST_ID) -> ProjectQuota | None:
        """A ProjectQuota when ``home`` is on XFS mounted with prjquota, else None."""
        home = Path(home)
        if prjquota_mount(home) is None:
            return None
        home.mkdir(parents=True, exist_ok=True)
        return cls(home, first_id)

    @contextmanager
    def _state(self) -> Iterator[dict[str, int]]:
        """The allocation map under an exclusive lock; written back atomically on success."""
        lock_fd = os.open(self.home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            path = self.home / STATE_FILE
            projects: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
            before = dict(projects)
            yield projects
            if projects != before:
                write_atomic(path, json.dumps(projects, sort_keys=True))
        finally:
            os.close(lock_fd)

    def key(self, directory: str | os.PathLike[str]) -> str:
        real = os.path.realpath(directory)
        home = os.path.realpath(self.home)
        rel = os.path.relpath(real, home)
        if rel == "." or rel.startswith(".."):
            raise InvalidArgument(f"{directory} is not below the quota home {self.home}")
        if not os.path.isdir(real):
            raise InvalidArgument(f"{directory} is not a directory")
        return rel

    def assign(self, directory: str | os.PathLike[str], size_bytes: int) -> int:
        """Give ``directory`` its own project (or keep the one it has) limited to ``size_bytes``."""
        if size_bytes <= 0:
            raise InvalidArgument(f"quota size must be positive, got {size_bytes}")
        key = self.key(directory)
        with self._state() as projects:
            pid = projects.get(key)
            if pid is None:
                pid = self._free_id(set(projects.values()))
                projects[key] = pid
        # the ID is recorded (durably) before it is used anywhere
        set_limit(self.home, pid, size_bytes)
        set_project_tree(self.home / key, pid)
        return pid

    def _free_id(self, recorded: set[int]) -> int:
        """The lowest ID no record names and nothing on the filesystem is charged to."""
        for pid in range(self.first_id, MAX_PROJECT_ID):
            if pid in recorded:
                continue
            usage = read_usage(self.home, pid)
            if usage.inodes == 0 and usage.used_bytes == 0:
                return pid
        raise NoSpace("no free XFS project id")

    def resize(self, directory: str | os.PathLike[str], size_bytes: int) -> int:
        """Change the limit of an assigned directory (only the limit when the directory
        carries its recorded ID: its content was tagged when it was assigned); else assign."""
        if size_bytes <= 0:
            raise InvalidArgument(f"quota size must be positive, got {size_bytes}")
        key = self.key(directory)
        pid = self.project_of(directory)
        if pid is None or get_project(self.home / key) != pid:
            return self.assign(directory, size_bytes)
        set_limit(self.home, pid, size_bytes)
        return pid

    def ensure(self, directory: str | os.PathLike[str], size_bytes: int) -> int:
        """Like :meth:`assign`, but without touching anything when the directory already
        carries its recorded ID and the limit is ``size_bytes`` (start-up checks)."""
        key = self.key(directory)
        pid = self.project_of(directory)
        if (pid is not None and get_project(self.home / key) == pid
                and read_usage(self.home, pid).limit_bytes == limit_of(size_bytes)):
            return pid
        return self.assign(directory, size_bytes)

    def adopt(self, directory: str | os.PathLike[str], limit_bytes: int = 0) -> int | None:
        """Record the ID ``directory`` already carries (a tagged directory renamed to a new
        place) under its new path, dropping the record of its old path, and set its limit
        (0: none). Returns the ID, or None when the directory carries none of ours.
        Idempotent."""
        key = self.key(directory)
        pid = get_project(self.home / key)
        if not self.first_id <= pid <= MAX_PROJECT_ID:
            return None
        with self._state() as projects:
            for other, other_pid in list(projects.items()):
                if other_pid == pid and other != key:
                    del projects[other]
            projects[key] = pid
        set_limit(self.home, pid, limit_bytes)
        return pid

    def project_of(self, directory: str | os.PathLike[str]) -> int | None:
        with self._state() as projects:
            return projects.get(self.key(directory))

    def usage(self, directory: str | os.PathLike[str]) -> ProjectUsage | None:
        pid = self.project_of(directory)
        return None if pid is None else read_usage(self.home, pid)

    def release(self, directory: str | os.PathLike[str]) -> None:
        """Clear the directory's limit and free its ID (idempotent; the dir may be gone)."""
        real = os.path.realpath(directory)
        rel = os.path.relpath(real, os.path.realpath(self.home))
        if rel == "." or rel.startswith(".."):
            raise InvalidArgument(f"{directory} is not below the quota home {self.home}")
        with self._state() as projects:
            pid = projects.get(rel)
            if pid is None:
                return
            set_limit(self.home, pid, 0)
            del projects[rel]

    def assigned(self) -> dict[str, int]:
        with self._state() as projects:
            return dict(projects)


def is_quota_error(exc: OSError) -> bool:
    """Whether a write failed because a project limit was hit."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
