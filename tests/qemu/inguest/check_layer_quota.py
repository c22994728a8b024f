"""Size enforcement of the overlay and vfs drivers on XFS mounted with ``prjquota``
(through :class:`csi.graphdriver.xfs_quota.ProjectQuota`). Runs inside the qemu guest
only: this host's kernel has no filesystem quotas.

While a driver does not use project quota yet it reports ``none (...)`` in
``size_enforcement()``; the check then reports xfail with that line, so the lane shows
the gap until the driver is wired, and turns into a real pass/fail the moment it is."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from csi import mount as mnt
from csi.graphdriver.base import CreateOpts, LayerDriver
from csi.graphdriver.overlay import OverlayDriver
from csi.graphdriver.vfs import VfsDriver

MIB = 1 << 20


@pytest.mark.parametrize("cls", [VfsDriver, OverlayDriver], ids=["vfs", "overlay"])
def test_writes_past_the_layer_size_fail(cls: type[LayerDriver], xfs_prjquota: Path) -> None:
    driver = cls(xfs_prjquota / cls.name, {})
    try:
        how = driver.size_enforcement()
        if how.startswith("none"):
            pytest.xfail(f"{cls.name} on XFS with prjquota does not enforce sizes yet: {how}")
        driver.create("small", opts=CreateOpts(size_bytes=16 * MIB))
        path = driver.get("small")
        written = 0
        with pytest.raises(OSError) as info:
            with open(path / "big", "wb") as f:
                for _ in range(64):
                    written += f.write(b"q" * MIB)
                    f.flush()
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
        assert written <= 16 * MIB
        driver.put("small")
        driver.remove("small")
    finally:
        driver.cleanup()
        for mp in mnt.mounts_under(driver.home):
            mnt.unmount(mp.target, detach=True)
        driver.store.close()
