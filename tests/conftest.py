"""Shared fixtures: real filesystems for the drivers under test.

* ``ext4_dir`` — a fresh directory on the machine's root filesystem (ext4 here).
* ``btrfs_dir`` — a fresh directory on a real btrfs filesystem made on a sparse loop
  file (one per test session, 4 GiB sparse, quotas enabled by the btrfs driver as needed).
Tests must run as root on Linux; the btrfs fixture skips, saying why, only when the kernel
or btrfs-progs lacks btrfs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.host import mount as mnt


def _kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


@pytest.fixture(scope="session")
def scratch_root() -> Iterator[Path]:
    """A session-wide scratch directory on the root filesystem (not tmpfs)."""
    base = Path(os.environ.get("STRATA_TEST_SCRATCH", "/var/tmp"))
    path = Path(tempfile.mkdtemp(prefix="strata-test-", dir=base))
    yield path
    for mp in mnt.mounts_under(path):
        mnt.unmount(mp.target, detach=True)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ext4_dir(scratch_root: Path) -> Path:
    path = scratch_root / f"ext4-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def btrfs_mount(scratch_root: Path) -> Iterator[Path]:
    """Mount point of a btrfs filesystem on a loop file, for the whole session."""
    if not _kernel_has("btrfs"):
        pytest.skip("kernel has no btrfs")
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("btrfs-progs not installed (run .ci/setup)")
    image = scratch_root / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(int(os.environ.get("STRATA_TEST_BTRFS_BYTES", 8 << 30)))
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    target = scratch_root / "btrfs"
    target.mkdir()
    try:
        mnt.mount(mnt.Mount("btrfs", loop, ()), target)
        yield target
    finally:
        for mp in mnt.mounts_under(target):
            mnt.unmount(mp.target, detach=True)
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def btrfs_dir(btrfs_mount: Path) -> Path:
    path = btrfs_mount / f"t-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path
