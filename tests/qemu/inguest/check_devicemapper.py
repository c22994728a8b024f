"""devicemapper driver checks on a real thin pool (loop-lvm on the guest's scratch disk).

Runs inside the qemu guest only: this host kernel has no device-mapper. Every check
builds its own pool and tears it down (pool device and loop devices) afterwards.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import AlreadyExists, Busy, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from csi.graphdriver.devicemapper import ioctl as dm
from csi.graphdriver.driver import CreateOpts
from csi.graphdriver.devicemapper.driver import DevmapperDriver

MIB = 1 << 20
DM_OPTIONS = {"dm.loopback": "true", "dm.loopdatasize": "4G", "dm.loopmetadatasize": "64M", "dm.basesize": "64M"}


def open_driver(home: Path, **extra: str) -> DevmapperDriver:
    return DevmapperDriver(home, {**DM_OPTIONS, **extra})


@pytest.fixture(params=["ext4", "xfs"])
def driver(request: pytest.FixtureRequest, dm_home: Path) -> Iterator[DevmapperDriver]:
    """A driver per filesystem; xfs layers start at 320 MiB (mkfs.xfs's minimum is 300)."""
    drv = open_driver(dm_home, **{"dm.fs": request.param, "dm.basesize": "64M" if request.param == "ext4" else "320M"})
    yield drv
    drv.release_pool()


def fill(path: Path, total: int) -> int:
    written = 0
    try:
        with open(path, "wb") as f:
            while written < total:
                written += f.write(b"z" * MIB)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    return written


def device_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def test_round_trip_snapshot_and_clone(driver: DevmapperDriver) -> None:
    driver.create("vol")
    path = driver.get("vol")
    (path / "data").write_text("v1")
    frozen = driver.freeze("vol", "snap")  # origin is active: suspended, snapped, resumed
    assert frozen.frozen and frozen.parent is None
    (path / "data").write_text("v2")
    clone = driver.create("clone", "snap")
    assert clone.parent == "snap"
    snap_view, clone_view = driver.get("snap"), driver.get("clone")
    assert (snap_view / "data").read_text() == "v1"
    assert (clone_view / "data").read_text() == "v1"
    with pytest.raises(OSError) as exc:
        (snap_view / "other").write_text("x")
    assert exc.value.errno == errno.EROFS
    (clone_view / "data").write_text("clone")
    assert (path / "data").read_text() == "v2"
    for lid in ("vol", "snap", "clone"):
        driver.put(lid)
    assert driver.get("clone").joinpath("data").read_text() == "clone"  # survives deactivation
    driver.put("clone")


def test_size_is_the_thin_device_size(dm_home: Path) -> None:
    driver = open_driver(dm_home)
    try:
        driver.create("small", opts=CreateOpts(size_bytes=32 * MIB))
        path = driver.get("small")
        assert device_bytes(driver.block_device("small")) == 32 * MIB
        written = fill(path / "big", 64 * MIB)
        assert 16 * MIB <= written < 32 * MIB
        driver.put("small")
        driver.create("default")
        driver.get("default")
        assert device_bytes(driver.block_device("default")) == 64 * MIB  # dm.basesize
        driver.put("default")
    finally:
        driver.release_pool()


def test_resize_grows_device_and_filesystem(driver: DevmapperDriver) -> None:
    base = driver.cfg.base_bytes
    driver.create("g")
    driver.resize("g", base + 64 * MIB)  # inactive: grown offline
    path = driver.get("g")
    assert device_bytes(driver.block_device("g")) == base + 64 * MIB
    before = os.statvfs(path).f_blocks * os.statvfs(path).f_frsize
    driver.resize("g", base + 128 * MIB)  # active and mounted: grown online
    after = os.statvfs(path).f_blocks * os.statvfs(path).f_frsize
    assert device_bytes(driver.block_device("g")) == base + 128 * MIB
    assert after > before + 48 * MIB
    assert fill(path / "f", base) == base
    with pytest.raises(InvalidArgument):
        driver.resize("g", base)
    driver.put("g")


def test_block_layers_are_raw_thin_devices(dm_home: Path) -> None:
    """A block layer has no filesystem: get refuses it, get_block activates the bare device;
    a snapshot of it taken while a writer holds it open sees the writer's buffered bytes."""
    driver = open_driver(dm_home)
    try:
        driver.create("b", opts=CreateOpts(size_bytes=32 * MIB, block=True))
        driver.create("f")
        with pytest.raises(InvalidArgument, match="no filesystem"):
            driver.get("b")
        with pytest.raises(InvalidArgument, match="holds a filesystem"):
            driver.get_block("f")
        dev = driver.get_block("b")
        assert device_bytes(dev) == 32 * MIB and not any((dm_home / "mnt" / "b").iterdir())
        pattern = os.urandom(MIB)
        fd = os.open(dev, os.O_RDWR)
        try:
            assert os.pread(fd, MIB, 0) == bytes(MIB), "a new block layer reads as zeros"
            os.pwrite(fd, pattern, 2 * MIB)  # buffered, not synced: freeze must flush it
            frozen = driver.freeze("b", "bs")
        finally:
            os.close(fd)
        assert frozen.block
        with pytest.raises(InvalidArgument, match="block layer"):
            driver.create("c", "bs")  # the child of a block layer must be one too
        driver.create("c", "bs", CreateOpts(block=True))
        driver.resize("b", 64 * MIB)  # active: the table grows, there is no filesystem to grow
        assert device_bytes(driver.block_device("b")) == 64 * MIB
        driver.put("b")
        with open(driver.get_block("c"), "rb") as f:
            f.seek(2 * MIB)
            assert f.read(MIB) == pattern
        driver.put("c")
        assert set(dm.list_devices(driver._prefix + "-")) == set()
    finally:
        driver.release_pool()


def test_clone_may_be_larger_but_not_smaller_than_parent(dm_home: Path) -> None:
    driver = open_driver(dm_home)
    try:
        driver.create("v", opts=CreateOpts(size_bytes=64 * MIB))
        driver.freeze("v", "s")
        with pytest.raises(InvalidArgument):
            driver.create("tiny", "s", CreateOpts(size_bytes=16 * MIB))
        assert not driver.exists("tiny")
        driver.create("big", "s", CreateOpts(size_bytes=128 * MIB))
        path = driver.get("big")
        assert os.statvfs(path).f_blocks * os.statvfs(path).f_frsize > 100 * MIB
        driver.put("big")
    finally:
        driver.release_pool()


def test_remove_returns_pool_space_and_defers_with_children(dm_home: Path) -> None:
    driver = open_driver(dm_home)
    try:
        base_used = dm.pool_status(driver.pool).used_data_blocks
        driver.create("v")
        fill(driver.get("v") / "f", 8 * MIB)
        driver.put("v")
        driver.freeze("v", "s")
        driver.create("c", "s")
        driver.remove("v")
        driver.remove("s")  # has a child: hidden, kept
        assert not driver.exists("s") and driver.exists("c")
        assert (driver.get("c") / "f").stat().st_size == 8 * MIB
        with pytest.raises(Busy):
            driver.remove("c")
        driver.put("c")
        driver.remove("c")  # last child: the hidden parent goes too
        assert driver.store.all() == []
        assert dm.pool_status(driver.pool).used_data_blocks == base_used
    finally:
        driver.release_pool()


def test_capacity_status_and_free_threshold(dm_home: Path) -> None:
    driver = open_driver(dm_home, **{"dm.min_free_space": "99"})
    try:
        cap = driver.capacity()
        assert cap.total_bytes == 4 << 30 and cap.available_bytes <= cap.total_bytes
        status = dict(driver.status())
        assert status["pool"] == driver.pool and "NOT FOR PRODUCTION" in status["pool mode"]
        assert status["data space used"].endswith(f"of {4 << 30} bytes")
        tid = dm.pool_status(driver.pool).transaction_id
        with pytest.raises(ResourceExhausted):
            driver.create("refused")
        assert driver.store.all() == [] and dm.pool_status(driver.pool).transaction_id == tid
    finally:
        driver.release_pool()


def test_full_threshold_refuses_before_the_pool_fills(dm_home: Path) -> None:
    """A 256 MiB pool with 50% reserve: once half is used, new layers are refused."""
    driver = open_driver(dm_home, **{"dm.loopdatasize": "256M", "dm.min_free_space": "50"})
    try:
        driver.create("a", opts=CreateOpts(size_bytes=200 * MIB))
        fill(driver.get("a") / "f", 150 * MIB)
        driver.put("a")
        with pytest.raises(ResourceExhausted, match="min_free_space"):
            driver.create("b")
        with pytest.raises(ResourceExhausted):
            driver.freeze("a", "s")
        assert [l.id for l in driver.store.all()] == ["a"]
    finally:
        driver.release_pool()


def test_xfs_refuses_sizes_below_its_minimum(dm_home: Path) -> None:
    with pytest.raises(InvalidArgument, match="minimum"):
        open_driver(dm_home, **{"dm.fs": "xfs"})  # dm.basesize 64M
    driver = open_driver(dm_home, **{"dm.fs": "xfs", "dm.basesize": "320M"})
    try:
        with pytest.raises(OutOfRange):
            driver.create("tiny", opts=CreateOpts(size_bytes=64 * MIB))
        assert driver.store.all() == []
    finally:
        driver.release_pool()


def test_bad_ids_touch_nothing(dm_home: Path) -> None:
    driver = open_driver(dm_home)
    try:
        tid = dm.pool_status(driver.pool).transaction_id
        for bad in ("../x", "a/b", "", "A", ".pool", "x" * 129):
            with pytest.raises(InvalidArgument):
                driver.create(bad)
            with pytest.raises((InvalidArgument, NotFound)):
                driver.get(bad)
        driver.create("ok")
        with pytest.raises(AlreadyExists):
            driver.create("ok")
        with pytest.raises(NotFound):
            driver.create("child", "missing-parent")
        with pytest.raises(InvalidArgument):
            driver.create("child", "ok")  # writable parent
        assert [l.id for l in driver.store.all()] == ["ok"]
        assert dm.pool_status(driver.pool).transaction_id == tid + 1
    finally:
        driver.release_pool()


def test_restart_keeps_layers_and_transaction(dm_home: Path) -> None:
    driver = open_driver(dm_home)
    driver.create("v")
    (driver.get("v") / "f").write_text("kept")
    driver.put("v")
    driver.freeze("v", "s")
    tid = dm.pool_status(driver.pool).transaction_id
    driver.release_pool()  # pool and loops gone, as after a reboot
    assert not dm.exists(driver.pool)
    again = open_driver(dm_home)
    try:
        assert dm.pool_status(again.pool).transaction_id == tid
        assert (again.get("s") / "f").read_text() == "kept"
        again.put("s")
    finally:
        again.release_pool()


def test_pool_changed_behind_our_back_stops_start_up(dm_home: Path) -> None:
    driver = open_driver(dm_home)
    tid = dm.pool_status(driver.pool).transaction_id
    dm.message(driver.pool, f"set_transaction_id {tid} {tid + 5}")
    driver.store.close()
    with pytest.raises(Exception, match="transaction id"):
        open_driver(dm_home)
    dm.message(driver.pool, f"set_transaction_id {tid + 5} {tid + 1}")  # one ahead: adopted
    again = open_driver(dm_home)
    assert again._record.transaction_id == tid + 1
    again.release_pool()


CHILD = r"""
import sys
from pathlib import Path
from csi.graphdriver.devicemapper.driver import DevmapperDriver
from csi.graphdriver.driver import CreateOpts
opts = dict(a.split("=", 1) for a in sys.argv[2:])
d = DevmapperDriver(Path(sys.argv[1]), opts)
print("ready", flush=True)
i = 0
while True:
    v, s, c = f"v{i}", f"s{i}", f"c{i}"
    d.create(v)
    (d.get(v) / "f").write_text(v)
    d.freeze(v, s)
    d.create(c, s)
    d.put(v)
    print("committed", i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("delay", [0.7, 2.3])
def test_kill_9_loses_nothing_committed_and_leaks_nothing(dm_home: Path, delay: float) -> None:
    """kill -9 a process in the middle of create/freeze/clone; a restarted driver has every
    committed layer with its content, and removing everything returns the pool to empty."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(dm_home), *(f"{k}={v}" for k, v in DM_OPTIONS.items())],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    committed = []
    assert proc.stdout.readline().startswith("committed")
    committed.append(0)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed += [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("committed")]
    driver = open_driver(dm_home)
    try:
        for i in committed:
            assert (driver.get(f"s{i}") / "f").read_text() == f"v{i}"
            assert (driver.get(f"c{i}") / "f").read_text() == f"v{i}"
            driver.put(f"s{i}")
            driver.put(f"c{i}")
        driver.cleanup()
        for layer in driver.store.all():
            assert layer.mounts == 0
            driver.remove(layer.id)
        assert driver.store.all() == []
        assert dm.pool_status(driver.pool).used_data_blocks == 0
        assert set(dm.list_devices(driver._prefix + "-")) == set()
        assert not any((dm_home / "mnt").iterdir())
    finally:
        driver.release_pool()
