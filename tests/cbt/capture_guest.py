"""Capture real thin-provisioning-tools output for the host tests (run inside the qemu guest).

How the files in ``tests/cbt/data`` were made (kernel lane guest, Debian 6.1 kernel, dm-thin,
thin-provisioning-tools 0.9.0 of the host tree)::

    .venv/bin/python -m tests.qemu.guest \\
        "cd $PWD && .venv/bin/python -m tests.cbt.capture_guest /tmp/xchg" # then copy the files

The scenario (pool block 64 KiB, block volume of 4 MiB = 64 blocks), recorded in
``scenario.json`` with device ids: volume ``vol`` written at blocks 0, 5, 6, 7, 20 ->
snapshot ``s1``; ``vol`` written at 6, 30, 31 and block 20 discarded -> snapshot ``s2``;
``clone`` created from ``s1``, written at 40 -> snapshot ``s3``. Then, under one metadata
snapshot: ``thin_dump -m`` of the whole pool (``dump.xml``), ``thin_delta -m`` of s1->s2,
s1->s3 and s2->s1 (``delta-*.xml``).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from csi.graphdriver.devicemapper import thinmeta
from csi.graphdriver.devicemapper.driver import DevmapperDriver
from csi.graphdriver.driver import CreateOpts

BLOCK = 64 << 10
BLKDISCARD = 0x1277
OPTIONS = {"dm.loopback": "true", "dm.loopdatasize": "1G", "dm.loopmetadatasize": "16M", "dm.blocksize": "64K"}


def write_blocks(dev: Path, blocks: list[int], tag: int) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        for b in blocks:
            os.pwrite(fd, bytes([(b + tag) % 251 + 1]) * BLOCK, b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(dev: Path, block: int) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", block * BLOCK, BLOCK))
    finally:
        os.close(fd)


def main(out: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="cbt-", dir="/var/tmp")) / "devicemapper"
    drv = DevmapperDriver(home, OPTIONS)
    try:
        drv.create("vol", opts=CreateOpts(size_bytes=64 * BLOCK, block=True))
        dev = drv.get_block("vol")
        write_blocks(dev, [0, 5, 6, 7, 20], 1)
        drv.freeze("vol", "s1")
        write_blocks(dev, [6, 30, 31], 2)
        discard(dev, 20)
        drv.freeze("vol", "s2")
        drv.create("clone", "s1", CreateOpts(block=True))
        write_blocks(drv.get_block("clone"), [40], 3)
        drv.freeze("clone", "s3")
        ids = {name: drv.layer(name).extra["device_id"] for name in ("vol", "s1", "s2", "clone", "s3")}
        (out / "scenario.json").write_text(json.dumps({"block_bytes": BLOCK, "capacity_bytes": 64 * BLOCK,
                                                       "device_ids": ids}, indent=1) + "\n")
        with thinmeta.metadata_snapshot(drv.pool, threading.Lock()) as meta:
            runs = {"dump.xml": ["thin_dump", "-m", str(meta)]}
            for a, b in (("s1", "s2"), ("s1", "s3"), ("s2", "s1")):
                runs[f"delta-{a}-{b}.xml"] = ["thin_delta", "-m", "--snap1", str(ids[a]), "--snap2", str(ids[b]),
                                              str(meta)]
            for name, cmd in runs.items():
                (out / name).write_bytes(subprocess.run(cmd, check=True, capture_output=True).stdout)
        for name in ("s1", "s2", "s3"):
            print(name, "allocated", drv.allocated_blocks(name))
        print("s1->s2", drv.changed_blocks("s1", "s2"))
        print("s1->s3", drv.changed_blocks("s1", "s3"))
        for lid in ("vol", "clone"):
            drv.put(lid)
    finally:
        drv.release_pool()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
