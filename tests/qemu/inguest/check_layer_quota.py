"""Size enforcement of the overlay and vfs drivers on XFS mounted with ``prjquota``
(:mod:`csi.graphdriver.quota.limits` over :class:`csi.graphdriver.quota.xfs.ProjectQuota`).
Runs inside the qemu guest only: this host's kernel has no filesystem quotas, and the
guest's has no aufs (so aufs, which shares overlay's quota code, is not run here).

Checked on the real kernel: writes past a layer's size fail; resize raises the limit
(online, while the layer is in use); removal releases the project ID, which the next
layer gets again with nothing stale charged to it; a new driver instance on the same home
keeps enforcing and restores a limit lost behind its back; overlay's O(1) freeze hands the
ID to the frozen layer; and ``kill -9`` at random moments or at overlay's freeze steps
leaves the quota records exactly in line with the layer records."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlay_kill import KILL_AT_STEP
from quota_writes import MIB, fill, near, wait_uncharged

from csi.host import mount as mnt
from csi.errors import OutOfRange
from csi.graphdriver.quota import xfs as xq
from csi.graphdriver.driver import CreateOpts, LayerState
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.quota.limits import LayerLimits
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.graphdriver.vfs import VfsDriver

DRIVERS = [VfsDriver, OverlayDriver]
IDS = ["vfs", "overlay"]


def open_driver(cls: type[LayerDriver], home: Path) -> LayerDriver:
    driver = cls(home, {})
    assert isinstance(driver.limits, LayerLimits), driver.size_enforcement()  # type: ignore[attr-defined]
    return driver


def close(driver: LayerDriver) -> None:
    """Drop a driver instance as a crash would (mounts gone with it, nothing cleaned up)."""
    for mp in mnt.mounts_under(driver.home):
        mnt.unmount(mp.target, detach=True)
    driver.store.close()


def limits(driver: LayerDriver) -> LayerLimits:
    return driver.limits  # type: ignore[attr-defined,no-any-return]


def project(driver: LayerDriver, layer_id: str) -> int | None:
    return limits(driver).quota.project_of(limits(driver).upper(layer_id))


def check_quota_matches_layers(driver: LayerDriver) -> None:
    """The invariant after any start-up: one record per ready writable layer with a size
    (ID on its upper dir and companions, limit = size), frozen layers' handed-over IDs
    without limit, nothing else; every ID distinct."""
    lim = limits(driver)
    records = lim.quota.assigned()
    assert len(set(records.values())) == len(records), records
    expected: set[str] = set()
    for layer in driver.store.all():
        assert layer.state is LayerState.READY, layer
        upper = lim.upper(layer.id)
        key = lim.quota.key(upper)
        pid = records.get(key)
        if layer.frozen:
            if pid is not None:
                expected.add(key)
                assert xq.get_project(upper) == pid
                assert xq.read_usage(lim.quota.home, pid).limit_bytes == 0
        elif layer.size_bytes:
            expected.add(key)
            assert pid is not None, f"layer {layer.id} of {layer.size_bytes} bytes has no project ID"
            assert xq.get_project(upper) == pid
            for companion in lim.companions(layer.id):
                assert xq.get_project(companion) == pid
            assert xq.read_usage(lim.quota.home, pid).limit_bytes == xq.limit_of(layer.size_bytes)
        else:
            assert pid is None
    assert set(records) == expected, (records, expected)


@pytest.fixture(params=DRIVERS, ids=IDS)
def home(request: pytest.FixtureRequest, xfs_prjquota: Path) -> Iterator[tuple[type[LayerDriver], Path]]:
    cls = request.param
    yield cls, xfs_prjquota / cls.name


@pytest.fixture
def driver(home: tuple[type[LayerDriver], Path]) -> Iterator[LayerDriver]:
    cls, path = home
    drv = open_driver(cls, path)
    yield drv
    drv.cleanup()
    close(drv)


def test_status_says_xfs_project_quota(driver: LayerDriver) -> None:
    how = driver.size_enforcement()
    assert how.startswith("xfs project quota"), how
    info = dict(driver.status())
    assert info["size enforcement"] == how
    driver.create("a", opts=CreateOpts(size_bytes=8 * MIB))
    assert dict(driver.status())["xfs project ids in use"] == "1"


def test_no_prjquota_says_none(guest_scratch: Path) -> None:
    """On the guest's ext4 scratch disk sizes are not enforced, and status says why."""
    for cls in DRIVERS:
        drv = cls(guest_scratch / f"plain-{cls.name}", {})
        try:
            assert drv.limits is None  # type: ignore[attr-defined]
            assert drv.size_enforcement() == "none (no project quota on ext4)"
        finally:
            close(drv)


def test_writes_past_the_layer_size_fail(driver: LayerDriver) -> None:
    driver.create("small", opts=CreateOpts(size_bytes=16 * MIB))
    path = driver.get("small")
    assert near(fill(path / "big", 64 * MIB), 16 * MIB)
    usage = driver.usage("small")
    assert usage is not None and 12 * MIB <= usage <= 16 * MIB
    st = os.statvfs(path)  # df inside the volume shows its size
    assert st.f_blocks * st.f_frsize == 16 * MIB
    driver.put("small")
    driver.create("unlimited")
    assert project(driver, "unlimited") is None
    assert fill(driver.get("unlimited") / "big", 32 * MIB) == 32 * MIB
    driver.put("unlimited")
    check_quota_matches_layers(driver)


def test_resize_raises_the_limit(driver: LayerDriver) -> None:
    driver.create("grow", opts=CreateOpts(size_bytes=8 * MIB))
    path = driver.get("grow")  # in use while it grows, as ControllerExpandVolume does it online
    first = fill(path / "a", 32 * MIB)
    assert near(first, 8 * MIB)
    pid = project(driver, "grow")
    driver.resize("grow", 24 * MIB)
    assert project(driver, "grow") == pid
    assert driver.layer("grow").size_bytes == 24 * MIB
    second = fill(path / "b", 32 * MIB)
    assert first + second > 8 * MIB + 8 * MIB, "writes past the old size succeed after the expansion"
    assert near(first + second, 24 * MIB), "and still stop at the new size"
    driver.put("grow")
    # an unlimited layer that gets a size: its existing content counts
    driver.create("free")
    path = driver.get("free")
    (path / "old").write_bytes(b"o" * (6 * MIB))
    driver.resize("free", 10 * MIB)
    assert fill(path / "new", 32 * MIB) <= 4 * MIB
    driver.put("free")
    check_quota_matches_layers(driver)


def test_remove_releases_the_project_id(driver: LayerDriver) -> None:
    driver.create("a", opts=CreateOpts(size_bytes=8 * MIB))
    (driver.get("a") / "data").write_bytes(b"d" * (5 * MIB))
    driver.put("a")
    pid = project(driver, "a")
    assert pid is not None
    driver.remove("a")
    assert limits(driver).quota.assigned() == {}
    assert xq.read_usage(limits(driver).quota.home, pid).limit_bytes == 0
    wait_uncharged(limits(driver).quota.home, pid)
    driver.create("b", opts=CreateOpts(size_bytes=8 * MIB))
    assert project(driver, "b") == pid, "the released ID is used again"
    assert near(fill(driver.get("b") / "full", 32 * MIB), 8 * MIB), "nothing stale is charged to it"
    driver.put("b")
    check_quota_matches_layers(driver)


def test_an_id_still_charged_is_not_handed_out(driver: LayerDriver) -> None:
    """A released ID whose files still exist somewhere is skipped by the next allocation."""
    quota = limits(driver).quota
    stray = quota.home / "stray"
    stray.mkdir()
    pid = quota.assign(stray, 8 * MIB)
    (stray / "f").write_bytes(b"s" * MIB)
    quota.release(stray)
    driver.create("c", opts=CreateOpts(size_bytes=8 * MIB))
    assert project(driver, "c") not in (None, pid)
    assert near(fill(driver.get("c") / "full", 32 * MIB), 8 * MIB)
    driver.put("c")


def test_reopened_driver_keeps_enforcing(home: tuple[type[LayerDriver], Path]) -> None:
    cls, path = home
    first = open_driver(cls, path)
    first.create("keep", opts=CreateOpts(size_bytes=8 * MIB))
    pid = project(first, "keep")
    close(first)  # no cleanup: a restart
    second = open_driver(cls, path)
    assert second.size_enforcement().startswith("xfs project quota")
    first_fill = fill(second.get("keep") / "a", 32 * MIB)
    assert near(first_fill, 8 * MIB)
    second.put("keep")
    assert project(second, "keep") == pid
    xq.set_limit(limits(second).quota.home, pid, 0)  # a limit lost behind the driver's back
    close(second)
    third = open_driver(cls, path)
    try:
        assert xq.read_usage(limits(third).quota.home, pid).limit_bytes == 8 * MIB, "restored at start-up"
        check_quota_matches_layers(third)
        third.resize("keep", 16 * MIB)
        assert near(first_fill + fill(third.get("keep") / "b", 32 * MIB), 16 * MIB)
        third.put("keep")
    finally:
        third.cleanup()
        close(third)


def test_frozen_layers_carry_no_limit(driver: LayerDriver) -> None:
    driver.create("s", opts=CreateOpts(size_bytes=8 * MIB))
    (driver.get("s") / "six").write_bytes(b"6" * (6 * MIB))
    driver.put("s")
    old = project(driver, "s")
    driver.freeze("s", "f")  # not mounted: overlay renames the upper dir (O(1))
    quota = limits(driver).quota
    new = project(driver, "s")
    frozen = project(driver, "f")
    if isinstance(driver, OverlayDriver):
        assert new is not None and new != old, "a fresh ID on the fresh upper dir"
        assert frozen == old, "the renamed upper dir keeps its ID, for accounting"
        usage = xq.read_usage(quota.home, old)
        assert usage.limit_bytes == 0 and usage.used_bytes >= 6 * MIB
        room = 8 * MIB  # the fresh upper dir is empty: the volume may write its size on top
    else:
        assert new == old
        assert frozen is None and xq.get_project(limits(driver).upper("f")) == 0
        room = 2 * MIB  # vfs: the copy of the six MiB counts
    path = driver.get("s")
    assert (path / "six").stat().st_size == 6 * MIB
    assert fill(path / "more", 32 * MIB) <= room
    # a freeze of a mounted layer copies: the copy has no ID, the source keeps its own
    driver.freeze("s", "g")
    assert project(driver, "g") is None and xq.get_project(limits(driver).upper("g")) == 0
    assert project(driver, "s") == new
    driver.put("s")
    check_quota_matches_layers(driver)
    for layer_id in ("s", "g", "f"):
        driver.remove(layer_id)
    assert quota.assigned() == {}


def test_child_smaller_than_its_parent_is_refused(driver: LayerDriver) -> None:
    driver.create("p")
    (driver.get("p") / "four").write_bytes(b"4" * (4 * MIB))
    driver.put("p")
    driver.freeze("p", "base")
    if isinstance(driver, OverlayDriver):  # the limit is on what the child adds
        driver.create("child", "base", CreateOpts(size_bytes=2 * MIB))
        assert (driver.get("child") / "four").stat().st_size == 4 * MIB
        driver.put("child")
        return
    before = limits(driver).quota.assigned()
    with pytest.raises(OutOfRange):
        driver.create("child", "base", CreateOpts(size_bytes=2 * MIB))
    assert not driver.exists("child") and driver.store.get("child") is None
    assert not (driver.home / "dir" / "child").exists()
    assert limits(driver).quota.assigned() == before
    driver.create("child", "base", CreateOpts(size_bytes=8 * MIB))
    assert fill(driver.get("child") / "more", 32 * MIB) <= 4 * MIB
    driver.put("child")


def test_inherited_symlinks_and_devices_stay_movable(driver: LayerDriver) -> None:
    """A child's copy of its parent is born in the child's project, symlinks and device
    nodes included (XFS refuses renames and links of another project's inodes: EXDEV)."""
    driver.create("p")
    path = driver.get("p")
    (path / "sub").mkdir()
    (path / "link").symlink_to("target")
    os.mkfifo(path / "fifo")
    os.mknod(path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    driver.put("p")
    driver.freeze("p", "base")
    driver.create("child", "base", CreateOpts(size_bytes=8 * MIB))
    path = driver.get("child")
    for name in ("link", "fifo", "null"):
        os.rename(path / name, path / "sub" / name)
        os.link(path / "sub" / name, path / f"{name}-2", follow_symlinks=False)
    assert os.readlink(path / "sub" / "link") == "target"
    driver.put("child")
    check_quota_matches_layers(driver)


# --------------------------------------------------------------------------- kill -9

_CRASH_CHILD = r"""
import json, sys
from csi.graphdriver.driver import CreateOpts
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.graphdriver.vfs import VfsDriver
cls = {"vfs": VfsDriver, "overlay": OverlayDriver}[sys.argv[1]]
drv = cls(sys.argv[2], {})
parent = None
for i in range(10_000):
    w = f"w{i}"
    drv.create(w, parent, CreateOpts(size_bytes=(4 + i) << 20))
    print("created", w, flush=True)
    with open(f"{drv.get(w)}/data", "wb") as f:
        f.write(b"c" * (1 << 20))
    drv.put(w)
    drv.resize(w, (8 + i) << 20)
    print("resized", w, flush=True)
    drv.freeze(w, f"f{i}")
    print("frozen", f"f{i}", flush=True)
    if i % 2:
        drv.remove(w)
        print("removed", w, flush=True)
    parent = f"f{i}"
"""


def run_child(cls: type[LayerDriver], home: Path, prelude: str = "",
              kill_after_lines: int | None = None, delay: float = 0.0) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", prelude + _CRASH_CHILD, cls.name, str(home)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    if kill_after_lines is not None:
        while len(lines) < kill_after_lines:
            line = proc.stdout.readline()
            assert line, f"the child stopped early (rc {proc.poll()})"
            lines.append(line)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return lines + rest.splitlines()


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_at_a_random_moment_leaks_no_id(home: tuple[type[LayerDriver], Path], seed: int) -> None:
    cls, path = home
    rng = random.Random(seed)
    lines = run_child(cls, path, kill_after_lines=rng.randint(3, 14), delay=rng.random() * 0.3)
    created = [line.split()[1] for line in lines if line.startswith("created")]
    drv = open_driver(cls, path)
    try:
        check_quota_matches_layers(drv)
        writable = [layer for layer in drv.layers() if not layer.frozen]
        assert {layer.id for layer in writable} <= set(created)
        for layer in writable:  # every committed writable layer still enforces its size
            assert layer.size_bytes is not None
            used = drv.usage(layer.id) or 0
            assert fill(drv.get(layer.id) / "fill", 64 * MIB) <= layer.size_bytes - used + MIB
            drv.put(layer.id)
        for layer in sorted(drv.layers(), key=lambda l: l.created, reverse=True):
            drv.remove(layer.id)
        drv.cleanup()
        assert drv.store.all() == [] and limits(drv).quota.assigned() == {}
    finally:
        close(drv)


@pytest.mark.parametrize("step", ["freeze-rename:made", "freeze-rename:moved", "freeze-rename:fresh",
                                  "freeze-rename:finished"])
def test_kill_9_in_an_overlay_freeze(xfs_prjquota: Path, step: str) -> None:
    """Crash points inside the O(1) freeze, where the ID moves from the writable layer's old
    upper dir (now the frozen layer's) to its fresh one."""
    path = xfs_prjquota / "overlay"
    lines = run_child(OverlayDriver, path, prelude=f"{KILL_AT_STEP}\nkill_at({step!r})\n")
    assert lines == ["created w0", "resized w0"], lines
    drv = open_driver(OverlayDriver, path)
    try:
        check_quota_matches_layers(drv)
        assert drv.exists("w0")
        assert (drv.get("w0") / "data").stat().st_size == MIB
        if drv.exists("f0"):  # the freeze was finished by recovery
            assert drv.layer("w0").parent == "f0"
            assert project(drv, "f0") not in (None, project(drv, "w0"))
            assert fill(drv.get("w0") / "more", 32 * MIB) <= 8 * MIB
        else:  # rolled back: the upper dir still holds the MiB written
            assert fill(drv.get("w0") / "more", 32 * MIB) <= 7 * MIB
        drv.put("w0")
        drv.put("w0")
    finally:
        drv.cleanup()
        close(drv)
