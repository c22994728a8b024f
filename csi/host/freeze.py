"""Filesystem freeze: the FIFREEZE / FITHAW ioctls (``fsfreeze(8)``), and a hold on writers
of given paths that works where a freeze would block strata's own work.

* :func:`frozen` — ``with frozen(mountpoint):`` the filesystem is synced and every writer to
  it blocks (in the kernel, at ``sb_start_write``) until the block ends; thawed on the way
  out, whatever happened inside. Use it where the work done while frozen does not write to
  that filesystem — a block-level snapshot of a device (devicemapper thin snapshot of a
  volume's own ext4/xfs). A filesystem-level snapshot (btrfs subvolume snapshot, a copy)
  on the frozen filesystem would block on the freeze itself.
* :func:`supports_freeze` — whether the filesystem type implements freeze (overlayfs and
  tmpfs do not; ext4, xfs, btrfs do).
* :func:`held_writers` — ``with held_writers(devices, paths, shared):`` every *other* process
  with a file open for writing on one of ``devices`` (``st_dev``: a btrfs subvolume or an
  overlay mount has its own), under one of ``paths`` (host paths: for a directory volume
  sharing its filesystem), or — from another mount namespace (a container), where host
  paths mean nothing — on one of the ``shared`` devices, is stopped (SIGSTOP) and
  confirmed stopped (every thread), then continued at the end. A
  ``write(2)`` in progress finishes before the stop takes effect, so every write is either
  before the hold or after it: a crash-consistent instant for several volumes at once,
  while strata itself can still write (snapshot, copy) on those filesystems. Processes
  that were already stopped stay stopped.

Contract: root only (CAP_SYS_ADMIN for the ioctls, CAP_KILL for the signals); errors are
:mod:`csi.errors` types chained to the OSError.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from csi.errors import StrataError, Unsupported

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
NO_FREEZE = frozenset({"overlay", "tmpfs", "proc", "sysfs", "fuse", "aufs", "ramfs"})
_STOP_WAIT_SECONDS = 5.0


def supports_freeze(fstype: str) -> bool:
    return fstype not in NO_FREEZE


def freeze(mountpoint: str | os.PathLike[str]) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    except OSError as exc:
        kind = Unsupported if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY) else StrataError
        raise kind(f"cannot freeze the filesystem at {mountpoint}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def thaw(mountpoint: str | os.PathLike[str]) -> None:
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not frozen
            raise StrataError(f"cannot thaw the filesystem at {mountpoint}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


@contextmanager
def frozen(mountpoints: Iterable[str | os.PathLike[str]]) -> Iterator[None]:
    """Freeze each distinct filesystem once (in order), thaw all in reverse at the end: every
    one is tried even when another's thaw fails (the first failure is raised afterwards), so
    one bad thaw never leaves the others frozen."""
    done: list[str | os.PathLike[str]] = []
    seen: set[int] = set()
    try:
        for mp in mountpoints:
            dev = os.stat(mp).st_dev
            if dev in seen:
                continue
            freeze(mp)
            seen.add(dev)
            done.append(mp)
        yield
    finally:
        failed: StrataError | None = None
        for mp in reversed(done):
            try:
                thaw(mp)
            except (StrataError, OSError) as exc:
                failed = failed or (exc if isinstance(exc, StrataError)
                                    else StrataError(f"cannot thaw the filesystem at {mp}: {exc}"))
        if failed is not None:
            raise failed


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _writable(pid: int, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE != os.O_RDONLY
    except (OSError, ValueError, IndexError):
        pass
    return False


def _mount_ns(pid: int | str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _uses(pid: int, devices: frozenset[int], paths: tuple[str, ...], shared: frozenset[int],
          own_ns: str) -> bool:
    """Whether ``pid`` has a file open for writing on ``devices``, under ``paths``, or — in
    another mount namespace, where host paths mean nothing — on ``shared`` devices."""
    base = f"/proc/{pid}"
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return False
    foreign = bool(shared) and _mount_ns(pid) != own_ns
    for fd in fds:
        link = f"{base}/fd/{fd}"
        try:
            dev = os.stat(link).st_dev
            if not (dev in devices or paths or (foreign and dev in shared)):
                continue
            if not _writable(pid, fd):
                continue
            if dev in devices or (foreign and dev in shared):
                return True
            target = os.readlink(link)
            if any(target == p or target.startswith(p + "/") for p in paths):
                return True
        except OSError:
            continue
    return False


@contextmanager
def held_writers(devices: Iterable[int] = (), paths: Iterable[str | os.PathLike[str]] = (),
                 shared: Iterable[int] = ()) -> Iterator[list[int]]:
    """Stop every other process writing to ``devices`` / under ``paths`` (and, from other
    mount namespaces, to ``shared`` devices) for the block (see module docstring); yields
    the PIDs held."""
    devs, shared_devs = frozenset(devices), frozenset(shared)
    prefixes = tuple(str(Path(p)) for p in paths)
    me = os.getpid()
    own_ns = _mount_ns("self")
    held: list[int] = []
    try:
        for _round in range(3):  # a process may open a file while others are being stopped
            found = [pid for pid in _pids() if pid != me and pid not in held and _state(pid) not in "TtZX"
                     and _uses(pid, devs, prefixes, shared_devs, own_ns)]
            if not found:
                break
            for pid in found:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    held.append(pid)
            deadline = time.monotonic() + _STOP_WAIT_SECONDS
            for pid in found:
                while any(_state(pid) not in "TtZX" and _state_of_task(pid, t) not in "TtZX"
                          for t in _threads(pid)):
                    if time.monotonic() > deadline:
                        raise StrataError(f"process {pid} did not stop within {_STOP_WAIT_SECONDS} s "
                                          "(uninterruptible I/O?)")
                    time.sleep(0.0005)
        yield held
    finally:
        for pid in held:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _state_of_task(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"
