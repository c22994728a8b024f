"""The only module that calls mount(2), umount2(2) and the new mount API.

Drivers describe mounts as data (:class:`Mount`); this module performs them.
Nothing here spawns ``mount``/``umount`` binaries.

* :func:`mount` performs a :class:`Mount` at a target. Overlay mounts whose option
  string would not fit one page (deep lower chains) go through the new mount API
  (``fsopen``/``fsconfig``/``fsmount``/``move_mount``) with one ``lowerdir+`` per layer.
* :func:`bind` makes a (read-only, if asked) bind mount.
* :func:`unmount` unmounts, optionally lazily; unmounting a path that is not a mount
  point is not an error when ``missing_ok``.
* :func:`mount_points` / :func:`is_mount_point` read ``/proc/self/mountinfo``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass, field

from csi.errors import InvalidArgument, NotFound, StrataError

# mount(2) flags (linux/mount.h)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SHARED = 0x100000

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# new mount API (x86_64 / generic syscall numbers are equal for these)
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_RDONLY = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4

_PAGE = os.sysconf("SC_PAGE_SIZE")

_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "remount": MS_REMOUNT,  # change a mount in place (aufs adds branches with remount,append:)
}
_NOOP_OPTIONS = {"rw", "suid", "dev", "exec", "atime", "defaults"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


class MountError(StrataError):
    """A mount or unmount failed; ``errno`` carries the kernel's reason."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(f"{message}: {os.strerror(err)} (errno {err})")
        self.errno = err


@dataclass(frozen=True)
class Mount:
    """A mount described as data: ``mount -t fstype -o options source target``.

    ``options`` holds both flag words (``ro``, ``nodev`` ...) and filesystem data
    (``lowerdir=...``). ``cwd`` (optional) is a directory to resolve relative paths in
    the options against: overlay's short relative lower paths need it.
    """

    fstype: str
    source: str
    options: tuple[str, ...] = ()
    cwd: str | None = None

    def flags_and_data(self) -> tuple[int, str]:
        """Split options into mount(2) flags and the filesystem data string."""
        flags, data = 0, []
        for opt in self.options:
            if opt in _FLAG_OPTIONS:
                flags |= _FLAG_OPTIONS[opt]
            elif opt in _NOOP_OPTIONS:
                continue
            elif opt == "bind":
                flags |= MS_BIND
            elif opt == "rbind":
                flags |= MS_BIND | MS_REC
            else:
                data.append(opt)
        return flags, ",".join(data)


@dataclass(frozen=True)
class MountPoint:
    """One line of /proc/self/mountinfo (the fields strata uses)."""

    mount_id: int
    parent_id: int
    root: str
    target: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...] = field(default=())

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _raise(message: str) -> None:
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        raise NotFound(f"{message}: {os.strerror(err)}") from MountError(message, err)
    raise MountError(message, err)


def _mount2(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        _raise(f"mount {fstype or ''} {source} on {target}")


class _Cwd:
    """Temporarily change the working directory (for relative overlay paths)."""

    def __init__(self, path: str | None) -> None:
        self.path, self.saved = path, -1

    def __enter__(self) -> None:
        if self.path:
            self.saved = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
            os.chdir(self.path)

    def __exit__(self, *exc: object) -> None:
        if self.saved >= 0:
            os.fchdir(self.saved)
            os.close(self.saved)


def mount(m: Mount, target: str | os.PathLike[str]) -> None:
    """Perform ``m`` at ``target``. Deep overlay chains use the new mount API."""
    target = os.fspath(target)
    flags, data = m.flags_and_data()
    if flags & MS_BIND:
        bind(m.source, target, readonly=bool(flags & MS_RDONLY), recursive=bool(flags & MS_REC))
        return
    if m.fstype == "overlay" and len(data.encode()) >= _PAGE - 1:
        _mount_fsconfig(m, target, flags)
        return
    with _Cwd(m.cwd):
        _mount2(m.source, target, m.fstype, flags, data or None)


def _fsconfig(fd: int, cmd: int, key: str | None, value: str | None) -> None:
    ret = _libc.syscall(_SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(cmd), _b(key), _b(value), ctypes.c_int(0))
    if ret < 0:
        _raise(f"fsconfig {key}={value}")


def _mount_fsconfig(m: Mount, target: str, flags: int) -> None:
    """Overlay through fsopen/fsconfig: one ``lowerdir+`` per layer, no page limit."""
    with _Cwd(m.cwd):
        fd = _libc.syscall(_SYS_FSOPEN, _b(m.fstype), ctypes.c_uint(_FSOPEN_CLOEXEC))
        if fd < 0:
            _raise(f"fsopen {m.fstype}")
        try:
            _fsconfig(fd, _FSCONFIG_SET_STRING, "source", m.source)
            for opt in m.options:
                if opt in _FLAG_OPTIONS or opt in _NOOP_OPTIONS:
                    continue
                key, _, value = opt.partition("=")
                if key == "lowerdir":
                    for lower in value.split(":"):
                        _fsconfig(fd, _FSCONFIG_SET_STRING, "lowerdir+", os.path.abspath(lower))
                elif value:
                    path_keys = {"upperdir", "workdir"}
                    _fsconfig(fd, _FSCONFIG_SET_STRING, key, os.path.abspath(value) if key in path_keys else value)
                else:
                    _fsconfig(fd, _FSCONFIG_SET_FLAG, key, None)
            _fsconfig(fd, _FSCONFIG_CMD_CREATE, None, None)
            attrs = _MOUNT_ATTR_RDONLY if flags & MS_RDONLY else 0
            mfd = _libc.syscall(_SYS_FSMOUNT, ctypes.c_int(fd), ctypes.c_uint(_FSMOUNT_CLOEXEC), ctypes.c_uint(attrs))
            if mfd < 0:
                _raise(f"fsmount {m.fstype}")
        finally:
            os.close(fd)
    try:
        ret = _libc.syscall(
            _SYS_MOVE_MOUNT, ctypes.c_int(mfd), b"", ctypes.c_int(-100), _b(target), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)
        )
        if ret < 0:
            _raise(f"move_mount to {target}")
    finally:
        os.close(mfd)


def bind(source: str | os.PathLike[str], target: str | os.PathLike[str], *, readonly: bool = False,
         recursive: bool = False, extra_flags: int = 0) -> None:
    """Bind-mount ``source`` at ``target``; read-only takes a second remount step."""
    source, target = os.fspath(source), os.fspath(target)
    base = MS_BIND | (MS_REC if recursive else 0)
    _mount2(source, target, None, base, None)
    if readonly or extra_flags:
        try:
            _mount2("none", target, None, base | MS_REMOUNT | extra_flags | (MS_RDONLY if readonly else 0), None)
        except Exception:
            unmount(target)
            raise


def remount_readonly(target: str | os.PathLike[str]) -> None:
    """Make an existing bind mount read-only."""
    _mount2("none", os.fspath(target), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def set_propagation(target: str | os.PathLike[str], flag: int, recursive: bool = True) -> None:
    """Change propagation (``MS_SHARED`` / ``MS_PRIVATE``) of the mount at ``target``."""
    _mount2("none", os.fspath(target), None, flag | (MS_REC if recursive else 0), None)


def unmount(target: str | os.PathLike[str], *, detach: bool = False, missing_ok: bool = True) -> bool:
    """Unmount ``target``; whether a mount was removed. Not mounted (EINVAL: the kernel's own
    answer for a path that is not the root of a mount) or absent (ENOENT) is fine when
    ``missing_ok``."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    if _libc.umount2(_b(os.fspath(target)), flags) != 0:
        err = ctypes.get_errno()
        if missing_ok and err in (errno.EINVAL, errno.ENOENT):
            return False
        raise MountError(f"umount {os.fspath(target)}", err)
    return True


def unmount_all(target: str | os.PathLike[str]) -> None:
    """Unmount every mount stacked on ``target`` (bind mounts may stack), until the kernel
    says nothing is mounted there (no read of the mount table)."""
    path = os.path.realpath(target)
    while unmount(path):
        pass


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_points() -> list[MountPoint]:
    """Parse /proc/self/mountinfo."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            parts, rparts = left.split(" "), right.split(" ")
            result.append(
                MountPoint(
                    mount_id=int(parts[0]),
                    parent_id=int(parts[1]),
                    root=_unescape(parts[3]),
                    target=_unescape(parts[4]),
                    options=tuple(parts[5].split(",")),
                    fstype=rparts[0],
                    source=_unescape(rparts[1]) if len(rparts) > 1 else "",
                    super_options=tuple(rparts[2].split(",")) if len(rparts) > 2 else (),
                )
            )
    return result


def find_mount(path: str | os.PathLike[str]) -> MountPoint | None:
    """The topmost mount whose target is exactly ``path`` (resolved), or None."""
    real = os.path.realpath(path)
    found = None
    for mp in mount_points():
        if mp.target == real:
            found = mp
    return found


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    return find_mount(path) is not None


def mounts_under(path: str | os.PathLike[str]) -> list[MountPoint]:
    """Mounts at or below ``path``, deepest first (the order to unmount them)."""
    real = os.path.realpath(path).rstrip("/") + "/"
    found = [mp for mp in mount_points() if (mp.target + "/").startswith(real)]
    return sorted(found, key=lambda mp: mp.target.count("/"), reverse=True)


def check_data_fits(m: Mount) -> None:
    """Raise InvalidArgument if a classic mount(2) data string would be cut at a page."""
    _, data = m.flags_and_data()
    if len(data.encode()) >= _PAGE - 1 and m.fstype != "overlay":
        raise InvalidArgument(f"mount options for {m.fstype} exceed one page ({len(data)} bytes)")
