"""Block maps of thin devices, read from the thin pool's own metadata (changed-block tracking).

What a thin device holds and how two thin devices differ is already in the pool's
metadata: each thin device is a b-tree from its virtual blocks to data blocks, and a
snapshot shares its origin's data blocks until either side writes (the write gets a new
data block). So:

* the *allocated* blocks of a device are its mapped virtual blocks (``thin_dump --dev-id``:
  ``<range_mapping origin_begin= length=>`` and ``<single_mapping origin_block=>``);
* the blocks *changed* between two devices are the virtual blocks mapped to different data
  blocks or mapped in one device only (``thin_delta --snap1 BASE --snap2 TARGET``:
  ``<different>``, ``<right_only>`` — written since — and ``<left_only>`` — discarded since,
  now reading zeros; ``<same>`` is left out).

Nothing reads the volume's data. Both tools read the metadata device of a *live* pool only
through a metadata snapshot: :func:`metadata_snapshot` sends ``reserve_metadata_snap`` to
the pool (the kernel commits the current transaction first, so every mapping made so far is
in it), the tools run with ``-m`` (which also opens the device without ``O_EXCL``, the pool
holding it), and ``release_metadata_snap`` follows. One metadata snapshot can be held per
pool; one left by a killed process (``reserve`` answers EBUSY) is released and reserved
again. Block numbers are in the pool's data block size (``data_block_size`` sectors in the
tools' ``<superblock>``), converted to bytes by :func:`block_map`.

The parsers take any byte stream of the tools' XML (``xml`` format, streamed with
``iterparse``), so they are tested on the host with output captured in the guest
(``tests/cbt/data``).
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from csi.errors import FailedPrecondition, StrataError
from csi.graphdriver.devicemapper import ioctl as dm
from csi.graphdriver.driver import BlockMap

__all__ = ["ThinExtents", "block_map", "changed", "mapped", "merge", "metadata_device", "metadata_snapshot",
           "parse_delta", "parse_dump"]

TOOLS = ("thin_dump", "thin_delta")
_CHANGED = frozenset({"different", "left_only", "right_only"})


@dataclass(frozen=True)
class ThinExtents:
    """Extents of virtual blocks ``(first block, count)``, ascending and merged, and the
    pool's data block size in sectors as the tool reported it."""

    block_sectors: int
    extents: tuple[tuple[int, int], ...]


def merge(extents: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort ``(start, length)`` extents and merge overlapping or adjacent ones."""
    out: list[list[int]] = []
    for start, length in sorted(extents):
        if length <= 0:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return tuple((s, n) for s, n in out)


def _events(stream: IO[bytes]) -> Iterator[ET.Element]:
    try:
        for _event, element in ET.iterparse(stream, events=("start",)):
            yield element
    except ET.ParseError as exc:
        raise StrataError(f"thin-provisioning-tools gave unreadable XML: {exc}") from exc


def parse_dump(stream: IO[bytes], device_id: int) -> ThinExtents:
    """The mapped virtual blocks of thin device ``device_id`` in ``thin_dump`` XML."""
    block_sectors, found, extents = 0, False, []
    current: int | None = None
    for el in _events(stream):
        if el.tag == "superblock":
            block_sectors = int(el.get("data_block_size", "0"))
        elif el.tag == "device":
            current = int(el.get("dev_id", "-1"))
            found = found or current == device_id
        elif current == device_id and el.tag == "range_mapping":
            extents.append((int(el.get("origin_begin", "0")), int(el.get("length", "0"))))
        elif current == device_id and el.tag == "single_mapping":
            extents.append((int(el.get("origin_block", "0")), 1))
        el.clear()
    if not found:
        raise StrataError(f"the thin pool's metadata has no device {device_id}")
    return ThinExtents(block_sectors, merge(extents))


def parse_delta(stream: IO[bytes]) -> ThinExtents:
    """The virtual blocks whose mapping differs between the two devices of a
    ``thin_delta`` XML report (``different``, ``left_only``, ``right_only``)."""
    block_sectors, seen, extents = 0, False, []
    for el in _events(stream):
        if el.tag == "superblock":
            block_sectors = int(el.get("data_block_size", "0"))
        elif el.tag == "diff":
            seen = True
        elif el.tag in _CHANGED:
            extents.append((int(el.get("begin", "0")), int(el.get("length", "0"))))
        el.clear()
    if not seen:
        raise StrataError("thin_delta reported no <diff>")
    return ThinExtents(block_sectors, merge(extents))


def block_map(found: ThinExtents, block_bytes: int, capacity_bytes: int) -> BlockMap:
    """Block extents -> a :class:`BlockMap` in bytes, cut at the device's capacity."""
    if found.block_sectors and found.block_sectors * dm.SECTOR != block_bytes:
        raise StrataError(f"the pool's metadata says blocks of {found.block_sectors * dm.SECTOR} bytes, "
                          f"its table {block_bytes}")
    limit = capacity_bytes // block_bytes  # thin devices are whole blocks (_sectors_for)
    extents = []
    for start, length in found.extents:
        end = min(start + length, limit)
        if start < end:
            extents.append((start * block_bytes, (end - start) * block_bytes))
    return BlockMap(block_size=block_bytes, capacity_bytes=capacity_bytes, extents=tuple(extents))


# ------------------------------------------------------------------ the live pool

def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def metadata_device(pool: str) -> Path:
    """The node of the pool's metadata device (first table parameter, ``major:minor``),
    found through sysfs (no udev needed)."""
    ttype, _, params = dm.table(pool)
    if ttype != "thin-pool":
        raise dm.DmError(f"{pool} is a {ttype} device, not a thin-pool")
    numbers = params.split()[0]
    uevent = Path("/sys/dev/block") / numbers / "uevent"
    try:
        for line in uevent.read_text().splitlines():
            if line.startswith("DEVNAME="):
                return Path("/dev") / line.split("=", 1)[1]
    except OSError as exc:
        raise StrataError(f"thin pool {pool}: metadata device {numbers} not found in sysfs") from exc
    raise StrataError(f"thin pool {pool}: metadata device {numbers} has no DEVNAME")


def release_leftover(pool: str) -> bool:
    """Release a metadata snapshot the pool holds (one a killed process left: strata holds
    one only inside :func:`metadata_snapshot`); whether there was one. Status field 4 is
    the held metadata root, ``-`` for none."""
    _, _, params = dm.table(pool, status=True)
    fields = params.split()
    if len(fields) > 3 and fields[3] not in ("-", "0"):
        dm.message(pool, "release_metadata_snap")
        return True
    return False


@contextmanager
def metadata_snapshot(pool: str, lock: threading.Lock) -> Iterator[Path]:
    """Hold the pool's metadata snapshot (``lock`` serialises its holders in this process);
    yields the metadata device to pass to the tools with ``-m``."""
    with lock:
        try:
            dm.message(pool, "reserve_metadata_snap")
        except dm.DmError as exc:
            if exc.errno != errno.EBUSY:
                raise
            dm.message(pool, "release_metadata_snap")  # left by a killed process: ours to drop
            dm.message(pool, "reserve_metadata_snap")
        try:
            yield metadata_device(pool)
        finally:
            dm.message(pool, "release_metadata_snap")


def _run(cmd: list[str], parse: Callable[[IO[bytes]], ThinExtents]) -> ThinExtents:
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{cmd[0]} is not installed (thin-provisioning-tools): changed-block "
                                 "tracking needs it") from exc
    try:
        assert proc.stdout is not None
        result = parse(proc.stdout)
        proc.stdout.read()
    except BaseException:
        proc.kill()
        raise
    finally:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        code = proc.wait()
    if code != 0:
        raise StrataError(f"{' '.join(cmd)} failed ({code}): {err.strip()[-500:]}")
    return result


def mapped(metadata: Path, device_id: int) -> ThinExtents:
    """The mapped blocks of ``device_id`` (inside :func:`metadata_snapshot`)."""
    return _run(["thin_dump", "-m", "--dev-id", str(device_id), str(metadata)],
                lambda out: parse_dump(out, device_id))


def changed(metadata: Path, base_device_id: int, device_id: int) -> ThinExtents:
    """The blocks that differ between two devices (inside :func:`metadata_snapshot`)."""
    return _run(["thin_delta", "-m", "--snap1", str(base_device_id), "--snap2", str(device_id), str(metadata)],
                parse_delta)
