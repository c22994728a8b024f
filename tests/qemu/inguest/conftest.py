"""Fixtures for the checks that run *inside* the qemu guest (kernel with device-mapper
and XFS quota). Collected only by the guest's pytest run (``check_*.py`` files, see
tests/qemu/test_guest.py); on the host nothing here is collected."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi.host import mount as mnt
from csi.graphdriver.devicemapper import ioctl as dm


@pytest.fixture
def guest_scratch() -> Iterator[Path]:
    """A fresh directory on the guest's scratch disk (ext4 on /dev/vda)."""
    path = Path(tempfile.mkdtemp(prefix="g-", dir=os.environ.get("STRATA_TEST_SCRATCH", "/var/tmp")))
    yield path
    for mp in mnt.mounts_under(path):
        mnt.unmount(mp.target, detach=True)
    shutil.rmtree(path, ignore_errors=True)


def release_devicemapper(home: Path) -> None:
    """Remove whatever a devicemapper home left active: mounts under it, thin devices, the
    pool, its loop devices (a failed check's leftovers; the data stays in the files)."""
    for mp in mnt.mounts_under(home):
        mnt.unmount(mp.target, detach=True)
    for name in dm.list_devices("strata-"):
        if not name.endswith(".pool"):
            dm.remove(name)
    for name in dm.list_devices("strata-"):
        dm.remove(name)
    for f in ("data", "metadata"):
        dm.detach_loop(home / "loop" / f)


@pytest.fixture
def dm_release() -> Callable[[Path], None]:
    """:func:`release_devicemapper`, for checks whose driver home another harness places."""
    return release_devicemapper


@pytest.fixture
def dm_home(guest_scratch: Path) -> Iterator[Path]:
    """A devicemapper driver home on the scratch disk, released after the check."""
    home = guest_scratch / "devicemapper"
    yield home
    release_devicemapper(home)


@pytest.fixture
def xfs_prjquota(guest_scratch: Path) -> Iterator[Path]:
    """An XFS filesystem mounted with prjquota, on a loop file (512 MiB sparse)."""
    image = guest_scratch / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    target = guest_scratch / f"xfs-{uuid.uuid4().hex[:6]}"
    target.mkdir()
    try:
        mnt.mount(mnt.Mount("xfs", loop, ("prjquota",)), target)
        yield target
    finally:
        for mp in mnt.mounts_under(target):
            mnt.unmount(mp.target, detach=True)
        subprocess.run(["losetup", "-d", loop], check=False)
