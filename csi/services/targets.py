"""Mount targets: the paths kubelet names, made ready, bound, and undone.

Contract: every path here was validated (:func:`csi.services.requests.check_path`); these
functions know nothing of layers, records or gRPC — the Node service and start-up recovery
both call them, each with its own bookkeeping around them. All mounting goes through
:mod:`csi.host.mount`.

* :func:`prepare_dir` / :func:`prepare_file` — create a filesystem volume's target (a
  directory) or a block volume's (an empty file); the parent must exist, and a path that
  is already something else is INVALID_ARGUMENT.
* :func:`bind` — bind mount a layer path, a staging path or a device node at a target
  (read-only, nosuid/nodev/noexec/noatime as asked).
* :func:`apply_mount_group` — ``volume_mount_group``: the volume root group-owned, setgid.
* :func:`remove_target` — the undo of ``prepare_*`` once the target is unmounted.
"""

from __future__ import annotations

import os
from pathlib import Path

from csi.errors import InvalidArgument
from csi.host import mount as mnt

_FLAG_BITS = {"nosuid": mnt.MS_NOSUID, "nodev": mnt.MS_NODEV, "noexec": mnt.MS_NOEXEC, "noatime": mnt.MS_NOATIME}


def flag_bits(flags: tuple[str, ...]) -> int:
    bits = 0
    for flag in flags:
        bits |= _FLAG_BITS.get(flag, 0)
    return bits


def bind(source: str | Path, target: str | Path, readonly: bool, flags: tuple[str, ...]) -> None:
    mnt.bind(source, target, readonly=readonly, extra_flags=flag_bits(flags))


def prepare_dir(path: str, what: str) -> None:
    """Create ``path`` (parents must exist); refuse a non-directory."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"{what} {path} exists and is not a directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise InvalidArgument(f"the parent directory of {what} {path} does not exist")
    os.makedirs(path, mode=0o750, exist_ok=True)


def prepare_file(path: str, what: str) -> None:
    """Create ``path`` as an empty file (a block volume's target; parents must exist)."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise InvalidArgument(f"{what} {path} exists and is not a regular file (block volumes are published "
                              "at a file)")
    if not os.path.isdir(os.path.dirname(path)):
        raise InvalidArgument(f"the parent directory of {what} {path} does not exist")
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640))


def remove_target(path: str) -> None:
    """Remove an unmounted target: the directory of a mount, the file of a block volume."""
    try:
        if os.path.isdir(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def apply_mount_group(path: Path, group: str) -> None:
    """Give the volume root to ``group`` with group rwx and setgid (volume_mount_group)."""
    if group:
        os.chown(path, -1, int(group))
        os.chmod(path, (os.stat(path).st_mode & 0o7777) | 0o2070)
