"""Facts about filesystems and paths, asked of the kernel (no strata terms).

* :func:`kernel_has` — whether ``/proc/filesystems`` lists a filesystem type;
* :func:`mount_of` / :func:`fstype_at` — the mount (and its type) that holds a path: the
  longest mount target in ``/proc/self/mountinfo`` that is the path's real location or one of
  its ancestors; a path that does not exist yet is asked about through its nearest existing
  ancestor (:func:`existing_ancestor`);
* :func:`fsync_dir` — make a directory's entries (a create, rename or unlink in it) durable;
  :func:`fsync_path` — a file's or directory's content and metadata, never through a symlink;
* :func:`parse_size` — ``"10G"``, ``"64M"``, ``"512KiB"``, ``"4096"`` to bytes (binary units).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from csi.errors import InvalidArgument
from csi.host.mount import MountPoint, mount_points

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def kernel_has(fstype: str) -> bool:
    """Whether the running kernel knows the filesystem type (``/proc/filesystems``)."""
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


def existing_ancestor(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (``/`` at worst)."""
    current = Path(os.path.abspath(path))
    while not current.exists():
        current = current.parent
    return current


def mount_of(path: str | os.PathLike[str]) -> MountPoint | None:
    """The mount holding ``path`` (see the module docstring), or None if none matches."""
    real = os.path.realpath(existing_ancestor(path))
    best: MountPoint | None = None
    for mp in mount_points():
        target = mp.target.rstrip("/") or "/"
        inside = real == target or real.startswith(target.rstrip("/") + "/")
        if inside and (best is None or len(target) >= len(best.target.rstrip("/") or "/")):
            best = mp
    return best


def fstype_at(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding ``path`` (``"unknown"`` if no mount matches)."""
    mp = mount_of(path)
    return mp.fstype if mp is not None else "unknown"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so the names created, renamed or removed in it survive a power cut."""
    fsync_path(path, directory=True)


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False, missing_ok: bool = False) -> None:
    """fsync the file (or, with ``directory``, the directory) at ``path``, never through a
    symlink. ``missing_ok``: a path that is gone, or is no longer that kind of entry, has
    nothing of its own to sync and is skipped."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if missing_ok and exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(text: str, what: str = "size") -> int:
    """A positive size in bytes from ``"10G"`` / ``"64M"`` / ``"512KiB"`` / ``"4096"``
    (binary units, an optional ``B``/``iB`` suffix, case-insensitive; fractions allowed
    before a unit, e.g. ``"1.5G"``). Anything else is InvalidArgument naming ``what``."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    try:
        amount = float(number) if unit else int(number)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: {text!r} is not a size like 10G") from exc
    size = int(amount * _UNITS[unit])
    if size <= 0:
        raise InvalidArgument(f"{what}: {text!r} must be positive")
    return size
