"""The one place strata talks to device-mapper (and attaches loop files for loop-lvm).

Why the ``dmsetup`` tool and not the raw ``DM_*`` ioctls: the thin-pool work here is a
handful of table loads and pool messages per layer operation, each of which ``dmsetup``
performs with one well-tested call (it packs ``struct dm_ioctl`` and its target specs,
and handles buffer growth for status and table replies). Re-implementing that packing
in ctypes would be a second, untested copy of libdevmapper for no gain in speed that
matters next to a mkfs or a mount. Every call goes through :func:`_dmsetup` with an
argument list (never a shell), with ``DM_DISABLE_UDEV=1`` so device nodes under
``/dev/mapper`` appear without relying on udev (nodes, containers and the qemu lane's
guest have none). Only the prerequisite probe opens ``/dev/mapper/control`` directly:
that is the check the issue names, and it says *why* device-mapper is missing.

Thin-pool status line (``dmsetup status POOL``; kernel doc ``thin-provisioning.rst``)::

    <start> <len> thin-pool <transaction id> <used meta>/<total meta> <used data>/<total data>
        <held root> ro|rw|out_of_data_space ...

Thin-pool table: ``0 <sectors> thin-pool <meta dev> <data dev> <block sectors> <low water>``.
Thin device table: ``0 <sectors> thin <pool dev> <device id>``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from csi.errors import NotSupported, PrerequisitesMissing, StrataError

DM_CONTROL = "/dev/mapper/control"
SECTOR = 512
MAX_DEVICE_ID = (1 << 24) - 1  # thin device ids are 24 bits


class DmError(StrataError):
    """A dmsetup or losetup call failed; the message carries its stderr."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(f"{message}: {stderr.strip()}" if stderr.strip() else message)
        self.stderr = stderr


class DeviceIdTaken(DmError):
    """``create_thin``/``create_snap`` named a device id the pool already has."""


class NoSuchDeviceId(DmError):
    """``delete`` named a device id the pool does not have."""


@dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    used_metadata_blocks: int
    total_metadata_blocks: int
    used_data_blocks: int
    total_data_blocks: int
    mode: str  # rw, ro, out_of_data_space, or Fail

    @property
    def free_data_blocks(self) -> int:
        return self.total_data_blocks - self.used_data_blocks


def probe() -> None:
    """Raise NotSupported / PrerequisitesMissing unless thin provisioning can run here."""
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR)
    except OSError as exc:
        raise NotSupported(
            f"device-mapper unavailable: opening {DM_CONTROL} failed: {os.strerror(exc.errno or 0)}"
            + (" (kernel without device-mapper)" if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT) else "")
        ) from exc
    os.close(fd)
    if shutil.which("dmsetup") is None:
        raise PrerequisitesMissing("dmsetup not installed (Debian package dmsetup)")
    names = set(targets())
    if "thin-pool" not in names or "thin" not in names:
        raise NotSupported(f"kernel lacks the thin-pool target (dm-thin-pool module); targets: {sorted(names)}")


def _dmsetup(*args: str) -> str:
    env = {**os.environ, "DM_DISABLE_UDEV": "1"}
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise DmError(f"dmsetup {' '.join(args)} failed", proc.stderr)
    return proc.stdout


def targets() -> dict[str, str]:
    """Loaded target types -> version (``dmsetup targets``)."""
    result = {}
    for line in _dmsetup("targets").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            result[parts[0]] = parts[1]
    return result


def device_path(name: str) -> Path:
    return Path("/dev/mapper") / name


def exists(name: str) -> bool:
    env = {**os.environ, "DM_DISABLE_UDEV": "1"}
    proc = subprocess.run(["dmsetup", "info", name], capture_output=True, text=True, env=env)
    return proc.returncode == 0


def list_devices(prefix: str) -> dict[str, bool]:
    """Mapped devices whose name starts with ``prefix`` -> whether each is suspended."""
    env = {**os.environ, "DM_DISABLE_UDEV": "1"}
    proc = subprocess.run(["dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,suspended"],
                          capture_output=True, text=True, env=env)
    result = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith(prefix):
            result[parts[0]] = parts[1].lower() == "suspended"
    return result


def create(name: str, table: str, *, readonly: bool = False) -> None:
    _dmsetup("create", name, *(["--readonly"] if readonly else []), "--table", table)


def table(name: str) -> str:
    return _dmsetup("table", name).strip()


def reload(name: str, new_table: str) -> None:
    """Load ``new_table`` and switch to it (suspend, reload, resume)."""
    _dmsetup("suspend", name)
    try:
        _dmsetup("reload", name, "--table", new_table)
    finally:
        _dmsetup("resume", name)


def suspend(name: str) -> None:
    """Suspend I/O (flushing and freezing a mounted filesystem first)."""
    _dmsetup("suspend", name)


def resume(name: str) -> None:
    _dmsetup("resume", name)


def remove(name: str, *, attempts: int = 20) -> None:
    """Remove a mapped device; absent is fine, busy is retried briefly (udev, lazy closers)."""
    for attempt in range(attempts):
        if not exists(name):
            return
        try:
            _dmsetup("remove", name)
            return
        except DmError as exc:
            if "busy" not in exc.stderr.lower() or attempt == attempts - 1:
                raise
            time.sleep(0.1)


def message(pool: str, text: str) -> None:
    """Send a thin-pool message (``create_thin``, ``create_snap``, ``delete``, ...)."""
    try:
        _dmsetup("message", pool, "0", text)
    except DmError as exc:
        low = exc.stderr.lower()
        if "file exists" in low:
            raise DeviceIdTaken(f"thin-pool {pool}: {text}", exc.stderr) from exc
        if "no data available" in low:
            raise NoSuchDeviceId(f"thin-pool {pool}: {text}", exc.stderr) from exc
        raise


def parse_pool_status(line: str) -> PoolStatus:
    """Parse a ``dmsetup status`` line of a thin-pool (see the module docstring)."""
    parts = line.split()
    if len(parts) < 4 or parts[2] != "thin-pool":
        raise DmError(f"not a thin-pool status line: {line!r}")
    if parts[3] == "Fail":
        raise DmError("thin-pool has failed (needs thin_check/thin_repair)")
    if len(parts) < 8:
        raise DmError(f"short thin-pool status line: {line!r}")
    meta_used, meta_total = (int(x) for x in parts[4].split("/"))
    data_used, data_total = (int(x) for x in parts[5].split("/"))
    return PoolStatus(int(parts[3]), meta_used, meta_total, data_used, data_total, parts[7])


def pool_status(pool: str) -> PoolStatus:
    try:
        return parse_pool_status(_dmsetup("status", pool).strip())
    except DmError as exc:
        raise DmError(f"thin pool {pool}: {exc}") from exc


def pool_block_sectors(pool: str) -> int:
    """The pool's data block size in sectors (fifth table field)."""
    parts = table(pool).split()
    if len(parts) < 6 or parts[2] != "thin-pool":
        raise DmError(f"{pool} is not a thin-pool: {' '.join(parts)!r}")
    return int(parts[5])


def dev_numbers(name: str) -> str:
    """``major:minor`` of a mapped device (stable name for tables)."""
    st = os.stat(device_path(name))
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


# ---------------------------------------------------------------- loop files (loop-lvm)

def _losetup(*args: str) -> str:
    proc = subprocess.run(["losetup", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DmError(f"losetup {' '.join(args)} failed", proc.stderr)
    return proc.stdout


def loop_of(path: Path) -> str | None:
    """The loop device already backed by ``path``, if any."""
    out = _losetup("-j", str(path)).strip()
    return out.split(":", 1)[0] if out else None


def attach_loop(path: Path) -> str:
    """Attach ``path`` to a loop device (reusing an existing attachment)."""
    return loop_of(path) or _losetup("--find", "--show", str(path)).strip()


def detach_loop(path: Path) -> None:
    dev = loop_of(path)
    if dev:
        _losetup("-d", dev)
