"""The one place strata talks to device-mapper: the ``DM_*`` ioctls on /dev/mapper/control
(and, for loop-lvm, attaching loop files).

Why ioctls and not the ``dmsetup`` tool: a layer operation is a handful of device-mapper
calls (create, load, resume, status, message, remove), and spawning a process per call
cost ~0.25-0.6 s each under the qemu lane's emulation (2-5 s per layer operation), while
the ioctl is a few microseconds. The interface is small and stable (``linux/dm-ioctl.h``,
version 4): one ``struct dm_ioctl`` header followed by a payload. Nothing here depends on
udev: device nodes are the kernel's own ``/dev/dm-<minor>`` (devtmpfs), and tables refer
to devices as ``major:minor``.

Thin-pool status (``TABLE_STATUS``, kernel doc ``thin-provisioning.rst``)::

    <transaction id> <used meta>/<total meta> <used data>/<total data> <held root> ro|rw|out_of_data_space ...

Thin-pool table: ``<meta dev> <data dev> <block sectors> <low water blocks>``;
thin device table: ``<pool dev> <device id>`` (both as single targets at sector 0).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from csi.errors import NotSupported, StrataError

DM_CONTROL = "/dev/mapper/control"
SECTOR = 512
MAX_DEVICE_ID = (1 << 24) - 1  # thin device ids are 24 bits

# linux/dm-ioctl.h
_HEADER = struct.Struct("=3IIIIiIII Q128s129s7x")  # struct dm_ioctl, 312 bytes
_SPEC = struct.Struct("=QQiI16s")  # struct dm_target_spec, 40 bytes
_VERSION = (4, 0, 0)
_DM_VERSION, _DM_LIST_DEVICES, _DM_DEV_CREATE, _DM_DEV_REMOVE = 0, 2, 3, 4
_DM_DEV_SUSPEND, _DM_DEV_STATUS, _DM_TABLE_LOAD, _DM_TABLE_STATUS = 6, 7, 9, 12
_DM_LIST_VERSIONS, _DM_TARGET_MSG = 13, 14
_SUSPEND_FLAG = 1 << 1
_STATUS_TABLE_FLAG = 1 << 4
_ACTIVE_PRESENT_FLAG = 1 << 5
_BUFFER_FULL_FLAG = 1 << 8
_BUFFER = 16 << 10

assert _HEADER.size == 312 and _SPEC.size == 40


def _request(cmd: int) -> int:
    return (3 << 30) | (_HEADER.size << 16) | (0xFD << 8) | cmd  # _IOWR(0xfd, cmd, struct dm_ioctl)


class DmError(StrataError):
    """A device-mapper (or losetup) call failed; ``errno`` carries the kernel's reason."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(f"{message}: {os.strerror(err)} (errno {err})" if err else message)
        self.errno = err


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
    mode: str  # rw, ro, out_of_data_space

    @property
    def free_data_blocks(self) -> int:
        return self.total_data_blocks - self.used_data_blocks


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    major: int
    minor: int
    suspended: bool
    open_count: int
    has_table: bool

    @property
    def path(self) -> Path:
        return Path(f"/dev/dm-{self.minor}")

    @property
    def numbers(self) -> str:
        return f"{self.major}:{self.minor}"


def _ioctl(cmd: int, name: str = "", flags: int = 0, payload: bytes = b"", size: int = _BUFFER,
           what: str = "", target_count: int = 0) -> tuple[tuple, bytes]:
    """One DM ioctl. Returns the header fields and the data area (grows on BUFFER_FULL)."""
    while True:
        buf = bytearray(max(size, _HEADER.size + len(payload) + 8))
        _HEADER.pack_into(buf, 0, *_VERSION, len(buf), _HEADER.size, target_count, 0, flags, 0, 0, 0,
                          name.encode(), b"")
        buf[_HEADER.size:_HEADER.size + len(payload)] = payload
        try:
            fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DmError(f"open {DM_CONTROL}", exc.errno or 0) from exc
        try:
            fcntl.ioctl(fd, _request(cmd), buf, True)
        except OSError as exc:
            raise DmError(what or f"device-mapper ioctl {cmd} on {name!r}", exc.errno or 0) from exc
        finally:
            os.close(fd)
        return_header = _HEADER.unpack_from(buf, 0)
        if return_header[7] & _BUFFER_FULL_FLAG and cmd != _DM_TARGET_MSG:
            size *= 4
            continue
        data_start, data_size = return_header[4], return_header[3]
        return return_header, bytes(buf[data_start:data_size])


def _targets_payload(targets: list[tuple[int, int, str, str]]) -> bytes:
    out = bytearray()
    for start, length, ttype, params in targets:
        body = params.encode() + b"\x00"
        total = _SPEC.size + len(body)
        total += -total % 8
        out += _SPEC.pack(start, length, 0, total, ttype.encode())
        out += body + b"\x00" * (total - _SPEC.size - len(body))
    return bytes(out)


def _parse_targets(data: bytes, count: int) -> list[tuple[int, int, str, str]]:
    result, offset = [], 0
    for _ in range(count):
        start, length, _status, nxt, ttype = _SPEC.unpack_from(data, offset)
        params = data[offset + _SPEC.size:].split(b"\x00", 1)[0].decode()
        result.append((start, length, ttype.rstrip(b"\x00").decode(), params))
        offset = nxt  # for status replies, "next" is relative to the data start
    return result


# ------------------------------------------------------------------ probing

def probe() -> None:
    """Raise NotSupported unless device-mapper with the thin targets works here."""
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR)
    except OSError as exc:
        hint = " (kernel without device-mapper)" if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT) else ""
        raise NotSupported(f"device-mapper unavailable: opening {DM_CONTROL} failed: "
                           f"{os.strerror(exc.errno or 0)}{hint}") from exc
    os.close(fd)
    names = set(targets())
    if "thin-pool" not in names or "thin" not in names:
        raise NotSupported(f"kernel lacks the thin-pool target (dm-thin-pool module); targets: {sorted(names)}")


def targets() -> dict[str, str]:
    """Loaded target types -> version."""
    _, data = _ioctl(_DM_LIST_VERSIONS, what="list device-mapper targets")
    result, offset = {}, 0
    while offset + 16 <= len(data):
        nxt, v0, v1, v2 = struct.unpack_from("=4I", data, offset)
        name = data[offset + 16:].split(b"\x00", 1)[0].decode()
        result[name] = f"v{v0}.{v1}.{v2}"
        if not nxt:
            break
        offset += nxt
    return result


# ------------------------------------------------------------------ devices

def info(name: str) -> DeviceInfo | None:
    """The device's state, or None when no device has that name."""
    try:
        header, _ = _ioctl(_DM_DEV_STATUS, name, what=f"status of {name}")
    except DmError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
    dev, flags = header[10], header[7]
    return DeviceInfo(name, os.major(dev), os.minor(dev), bool(flags & _SUSPEND_FLAG), header[6],
                      bool(flags & _ACTIVE_PRESENT_FLAG))


def exists(name: str) -> bool:
    return info(name) is not None


def mapper_path(name: str) -> Path:
    """The udev-made alias of a device (present only where udev runs)."""
    return Path("/dev/mapper") / name


def device_path(name: str) -> Path:
    found = info(name)
    if found is None:
        raise DmError(f"no device-mapper device {name}", errno.ENXIO)
    return found.path


def list_devices(prefix: str = "") -> dict[str, bool]:
    """Devices whose name starts with ``prefix`` -> whether each is suspended."""
    _, data = _ioctl(_DM_LIST_DEVICES, what="list device-mapper devices")
    names, offset = [], 0
    while offset + 12 <= len(data):
        _dev, nxt = struct.unpack_from("=QI", data, offset)
        name = data[offset + 12:].split(b"\x00", 1)[0].decode()
        if name:
            names.append(name)
        if not nxt:
            break
        offset += nxt
    result = {}
    for name in names:
        if name.startswith(prefix):
            found = info(name)
            if found is not None:
                result[name] = found.suspended
    return result


def create(name: str, ttype: str, sectors: int, params: str) -> DeviceInfo:
    """Create device ``name`` with one target and activate it. Undone on failure."""
    _ioctl(_DM_DEV_CREATE, name, what=f"create {name}")
    try:
        load(name, ttype, sectors, params)
        resume(name)
    except BaseException:
        remove(name)
        raise
    found = info(name)
    assert found is not None
    return found


def load(name: str, ttype: str, sectors: int, params: str) -> None:
    """Load a table into the device's inactive slot (active after the next resume)."""
    payload = _targets_payload([(0, sectors, ttype, params)])
    _ioctl(_DM_TABLE_LOAD, name, payload=payload, target_count=1, what=f"load {ttype} table into {name} ({params})")


def reload(name: str, ttype: str, sectors: int, params: str) -> None:
    """Switch a live device to a new table (load, suspend, resume)."""
    load(name, ttype, sectors, params)
    suspend(name)
    resume(name)


def suspend(name: str) -> None:
    """Suspend I/O, flushing and freezing a mounted filesystem first."""
    _ioctl(_DM_DEV_SUSPEND, name, flags=_SUSPEND_FLAG, what=f"suspend {name}")


def resume(name: str) -> None:
    _ioctl(_DM_DEV_SUSPEND, name, what=f"resume {name}")


def remove(name: str, *, attempts: int = 20) -> None:
    """Remove a device; absent is fine, busy is retried briefly (lazy closers)."""
    for attempt in range(attempts):
        try:
            _ioctl(_DM_DEV_REMOVE, name, what=f"remove {name}")
            return
        except DmError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno != errno.EBUSY or attempt == attempts - 1:
                raise
            time.sleep(0.1)


def table(name: str, *, status: bool = False) -> tuple[str, int, str]:
    """(target type, sectors, params) of the live table, or of its status line."""
    header, data = _ioctl(_DM_TABLE_STATUS, name, flags=0 if status else _STATUS_TABLE_FLAG,
                          what=f"{'status' if status else 'table'} of {name}")
    parsed = _parse_targets(data, header[5])
    if len(parsed) != 1:
        raise DmError(f"{name} has {len(parsed)} targets, expected one")
    _start, length, ttype, params = parsed[0]
    return ttype, length, params


def message(pool: str, text: str) -> None:
    """Send a thin-pool message (``create_thin``, ``create_snap``, ``delete``, ...)."""
    payload = struct.pack("=Q", 0) + text.encode() + b"\x00"
    try:
        _ioctl(_DM_TARGET_MSG, pool, payload=payload, what=f"thin-pool {pool}: {text}")
    except DmError as exc:
        if exc.errno == errno.EEXIST:
            raise DeviceIdTaken(f"thin-pool {pool}: {text}", exc.errno) from exc
        if exc.errno == errno.ENODATA:
            raise NoSuchDeviceId(f"thin-pool {pool}: {text}", exc.errno) from exc
        raise


# ------------------------------------------------------------------ thin pools

def parse_pool_status(params: str) -> PoolStatus:
    """Parse the params of a thin-pool status (see the module docstring)."""
    parts = params.split()
    if parts[:1] == ["Fail"]:
        raise DmError("thin-pool has failed (needs thin_check/thin_repair)")
    if len(parts) < 5 or "/" not in parts[1] or "/" not in parts[2]:
        raise DmError(f"not a thin-pool status: {params!r}")
    meta_used, meta_total = (int(x) for x in parts[1].split("/"))
    data_used, data_total = (int(x) for x in parts[2].split("/"))
    return PoolStatus(int(parts[0]), meta_used, meta_total, data_used, data_total, parts[4])


def pool_status(pool: str) -> PoolStatus:
    ttype, _, params = table(pool, status=True)
    if ttype != "thin-pool":
        raise DmError(f"{pool} is a {ttype} device, not a thin-pool")
    try:
        return parse_pool_status(params)
    except DmError as exc:
        raise DmError(f"thin pool {pool}: {exc}") from exc


def pool_block_sectors(pool: str) -> int:
    """The pool's data block size in sectors (third table parameter)."""
    ttype, _, params = table(pool)
    if ttype != "thin-pool":
        raise DmError(f"{pool} is a {ttype} device, not a thin-pool")
    return int(params.split()[2])


# ------------------------------------------------------------------ loop files (loop-lvm)

def loop_of(path: Path) -> str | None:
    """The loop device already backed by ``path``, if any (from sysfs)."""
    real = os.path.realpath(path)
    sys_block = Path("/sys/block")
    for entry in sys_block.glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == real:
            return f"/dev/{entry.name}"
    return None


def _losetup(*args: str) -> str:
    proc = subprocess.run(["losetup", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DmError(f"losetup {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def attach_loop(path: Path) -> str:
    """Attach ``path`` to a loop device (reusing an existing attachment)."""
    return loop_of(path) or _losetup("--find", "--show", str(path)).strip()


def detach_loop(path: Path) -> None:
    dev = loop_of(path)
    if dev:
        _losetup("-d", dev)
