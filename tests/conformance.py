"""The ONE conformance suite every layered driver runs (zarr-python style base class).

Fixture contract — a driver's test module does only this::

    from conformance import DriverConformance, open_driver

    class TestVfsOnExt4(DriverConformance):
        @pytest.fixture
        def driver(self, ext4_dir):          # function-scoped, a fresh home each test
            with open_driver(VfsDriver, ext4_dir / "vfs") as drv:
                yield drv

Optional class attributes (capabilities):

* ``max_depth`` — length of the deepest parent chain to check (128; overlay uses 500).
* ``device_nodes`` — whether layers can hold device nodes/fifos (True).

Everything runs on the real kernel as root. A check skips only when the kernel or the
filesystem lacks the feature, and the skip message says which. A new driver instance on
the same home (``reopen``) stands for "the node restarted"; the crash check really
``kill -9``s a subprocess that drives the same driver class on the same home.

The diff checks live in ``conformance_diffs.py`` (a mixin of :class:`DriverConformance`,
so a subclass gets them all). The tree helpers (:func:`populate`, :func:`mutate`, :func:`tree_state`,
:func:`assert_same_tree`) live in ``layertree.py`` and are re-exported here.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

from csi.host import mount as mnt
from csi.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from csi.graphdriver.driver import CreateOpts
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.driver import LayerState
from conformance_diffs import DiffChecks
from conformance_recovery import RecoveryChecks
from layertree import T0, FileState, assert_same_tree, mutate, populate, set_mtimes, tree_state

__all__ = [
    "BAD_IDS", "DriverConformance", "FileState", "T0", "assert_same_tree", "mutate", "open_driver", "populate",
    "reopen", "set_mtimes", "tree_state",
]

# --------------------------------------------------------------------------- helpers


@contextmanager
def open_driver(cls: type[LayerDriver], home: Path, options: dict[str, str] | None = None) -> Iterator[LayerDriver]:
    """A driver on ``home`` that is torn down afterwards: every mount released and
    nothing mounted left under ``home`` (the test fails if the driver leaks one)."""
    drv = cls(home, options or {})
    try:
        yield drv
    finally:
        try:
            drv.cleanup()
        finally:
            leftovers = mnt.mounts_under(home)
            for mp in leftovers:
                mnt.unmount(mp.target, detach=True)
            drv.store.close()
    assert not leftovers, f"driver left mounts behind after cleanup(): {[m.target for m in leftovers]}"


def reopen(drv: LayerDriver) -> LayerDriver:
    """A fresh instance on the same home: what a restarted node sees."""
    return type(drv)(drv.home, dict(drv.options))


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _expect_erofs(action: Any, *args: Any) -> None:
    with pytest.raises(OSError) as info:
        action(*args)
    assert info.value.errno == errno.EROFS, f"{action.__name__}{args}: {info.value}"


def _listing(root: Path) -> list[str]:
    return sorted(str(Path(d, n).relative_to(root)) for d, ds, fs in os.walk(root) for n in ds + fs)


BAD_IDS = ["../x", "/etc", "", "a/b", "a\x00b", "x" * 129, "Upper", ".", "..", " a", "a.b", None, 7]

# The crash check's subprocess: creates, fills, freezes and removes layers on ``home``
# and prints one line per committed call; the test kill -9s it at a random moment.
_CRASH_CHILD = r"""
import importlib, json, sys
mod, cls, home, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
drv = getattr(importlib.import_module(mod), cls)(home, options)
parent = None
for i in range(10_000):
    w = f"w{i}"
    drv.create(w, parent)
    path = drv.get(w)
    for k in range(20):
        with open(f"{path}/f{i}-{k}", "w") as f:
            f.write(f"{i}-{k}" * 100)
    drv.put(w)
    print("created", w, i, flush=True)
    drv.freeze(w, f"f{i}")
    print("frozen", f"f{i}", i, flush=True)
    if i % 2:
        drv.remove(w)
        print("removed", w, i, flush=True)
    parent = f"f{i}"
"""


# --------------------------------------------------------------------------- the suite


class DriverConformance(DiffChecks, RecoveryChecks):
    """Shared checks. Subclasses provide the ``driver`` fixture (see module docstring)."""

    max_depth: ClassVar[int] = 128
    device_nodes: ClassVar[bool] = True

    @pytest.fixture
    def driver(self) -> Iterator[LayerDriver]:  # pragma: no cover - subclasses override
        raise NotImplementedError("a DriverConformance subclass must provide a `driver` fixture")

    # -- helpers on top of the driver

    @contextmanager
    def mounted(self, drv: LayerDriver, layer_id: str) -> Iterator[Path]:
        path = drv.get(layer_id)
        try:
            yield path
        finally:
            drv.put(layer_id)

    def frozen_base(self, drv: LayerDriver, frozen_id: str = "base") -> str:
        """A frozen layer holding :func:`populate`'s tree."""
        drv.create("base-w")
        with self.mounted(drv, "base-w") as path:
            populate(path, device_nodes=self.device_nodes)
        drv.freeze("base-w", frozen_id)
        drv.remove("base-w")
        return frozen_id

    # -- create / parent chains

    def test_empty_create(self, driver: LayerDriver) -> None:
        layer = driver.create("empty")
        assert layer.state is LayerState.READY and not layer.frozen and layer.parent is None
        assert driver.exists("empty") and not driver.exists("other")
        with self.mounted(driver, "empty") as path:
            assert path.is_dir() and os.listdir(path) == []
            (path / "written").write_text("ok")
        with pytest.raises(AlreadyExists):
            driver.create("empty")
        with pytest.raises(NotFound):
            driver.create("child", "missing-parent")
        assert not driver.exists("child")

    def test_child_sees_parent(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("child", base)
        with self.mounted(driver, base) as bpath, self.mounted(driver, "child") as cpath:
            assert_same_tree(bpath, cpath)
            assert (cpath / "sparse").stat().st_size == (8 << 20) + 3

    def test_writable_layer_cannot_be_a_parent(self, driver: LayerDriver) -> None:
        driver.create("w")
        with pytest.raises(InvalidArgument):
            driver.create("child", "w")
        assert not driver.exists("child")

    def test_writes_isolated_both_ways(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("a", base)
        driver.create("b", base)
        with self.mounted(driver, "a") as a, self.mounted(driver, "b") as b, self.mounted(driver, base) as p:
            before = tree_state(p)
            (a / "etc" / "conf").write_text("changed in a")
            (a / "only-a").write_text("a")
            (a / "data" / "to-delete").unlink()
            (b / "only-b").write_text("b")
            assert (b / "etc" / "conf").read_text() == "key = value\n"
            assert not (b / "only-a").exists() and (b / "data" / "to-delete").exists()
            assert not (a / "only-b").exists()
            assert tree_state(p) == before
            _expect_erofs(_write, p / "etc" / "conf", "through the parent")

    def test_deep_chain(self, driver: LayerDriver) -> None:
        parent = None
        for i in range(self.max_depth - 1):
            driver.create(f"w{i}", parent)
            with self.mounted(driver, f"w{i}") as path:
                (path / f"level-{i}").write_text(str(i))
                if i:
                    (path / f"level-{i - 1}").write_text(f"overwritten at {i}")
            driver.freeze(f"w{i}", f"f{i}")
            driver.remove(f"w{i}")
            parent = f"f{i}"
        driver.create("top", parent)
        assert len(driver.chain("top")) == self.max_depth
        with self.mounted(driver, "top") as path:
            names = sorted(os.listdir(path))
            assert names == sorted(f"level-{i}" for i in range(self.max_depth - 1))
            assert (path / "level-0").read_text() == "overwritten at 1"
            assert (path / f"level-{self.max_depth - 2}").read_text() == str(self.max_depth - 2)
            (path / "top-file").write_text("top")

    # -- frozen layers and freeze

    def test_frozen_layer_is_read_only(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        with self.mounted(driver, base) as path:
            _expect_erofs(_write, path / "new", "x")
            _expect_erofs(_write, path / "etc" / "conf", "x")
            _expect_erofs(os.mkdir, path / "newdir")
            _expect_erofs(os.unlink, path / "hard-a")
            _expect_erofs(os.chmod, path / "etc", 0o777)
            _expect_erofs(os.setxattr, path / "etc" / "conf", "user.x", b"1")
            _expect_erofs(os.rename, path / "hard-a", path / "hard-z")

    def test_freeze_unmounted(self, driver: LayerDriver) -> None:
        driver.create("w")
        with self.mounted(driver, "w") as path:
            populate(path, device_nodes=self.device_nodes)
            expected = tree_state(path)
        frozen = driver.freeze("w", "snap")
        assert frozen.frozen and frozen.state is LayerState.READY and driver.exists("snap")
        self._check_freeze_result(driver, expected)

    def test_freeze_mounted(self, driver: LayerDriver) -> None:
        driver.create("w")
        path = driver.get("w")
        try:
            populate(path, device_nodes=self.device_nodes)
            expected = tree_state(path)
            driver.freeze("w", "snap")
            # the held path stays writable and keeps showing the content
            assert tree_state(path) == expected
            (path / "after-freeze").write_text("through the held mount")
            assert (path / "after-freeze").read_text() == "through the held mount"
            (path / "after-freeze").unlink()
        finally:
            driver.put("w")
        self._check_freeze_result(driver, expected)

    def _check_freeze_result(self, driver: LayerDriver, expected: dict[str, FileState]) -> None:
        with self.mounted(driver, "snap") as spath:
            assert tree_state(spath) == expected
            _expect_erofs(_write, spath / "new", "x")
        with self.mounted(driver, "w") as wpath:
            assert tree_state(wpath) == expected  # unchanged by the freeze
            (wpath / "etc" / "conf").write_text("written after the freeze")
            (wpath / "later").write_text("later")
            shutil.rmtree(wpath / "data")
        with self.mounted(driver, "snap") as spath:
            assert tree_state(spath) == expected  # the snapshot does not follow
        driver.create("clone", "snap")
        with self.mounted(driver, "clone") as cpath:
            assert tree_state(cpath) == expected
        with pytest.raises(InvalidArgument):
            driver.freeze("snap", "snap2")
        with pytest.raises(AlreadyExists):
            driver.freeze("w", "snap")
        with pytest.raises(NotFound):
            driver.freeze("missing", "snap3")
        assert not driver.exists("snap2") and not driver.exists("snap3")

    def test_freeze_of_a_child_layer(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("w", base)
        with self.mounted(driver, "w") as path:
            mutate(path)
            expected = tree_state(path)
        driver.freeze("w", "snap")
        driver.create("restore", "snap")
        with self.mounted(driver, "restore") as rpath:
            assert tree_state(rpath) == expected

    # -- removal

    def test_remove_with_children_is_deferred(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("child", base)
        driver.remove(base)
        assert not driver.exists(base)
        assert base not in {l.id for l in driver.layers()}
        assert base in driver._on_disk(), "a hidden layer with children must stay on disk"
        with pytest.raises(NotFound):
            driver.get(base)
        with pytest.raises(NotFound):
            driver.create("other", base)
        with self.mounted(driver, "child") as path:
            assert (path / "etc" / "conf").read_text() == "key = value\n"
        assert dict(driver.status())["hidden layers (removal deferred)"] == "1"
        reopened = reopen(driver)  # still deferred after a restart
        try:
            assert base in reopened._on_disk() and not reopened.exists(base)
        finally:
            reopened.store.close()
        driver.remove("child")
        assert base not in driver._on_disk() and "child" not in driver._on_disk()
        assert driver.store.get(base) is None

    def test_remove_busy_layer_refused(self, driver: LayerDriver) -> None:
        driver.create("w")
        driver.get("w")
        with pytest.raises(Busy):
            driver.remove("w")
        driver.put("w")
        driver.remove("w")
        assert not driver.exists("w") and "w" not in driver._on_disk()

    def test_idempotent_put_remove_cleanup(self, driver: LayerDriver) -> None:
        driver.create("w")
        driver.put("w")  # put without get
        p1 = driver.get("w")
        p2 = driver.get("w")
        assert p1 == p2 and driver.layer("w").mounts == 2
        driver.put("w")
        assert (p1 / ".").is_dir()
        driver.put("w")
        driver.put("w")
        assert driver.layer("w").mounts == 0
        driver.remove("w")
        driver.remove("w")
        driver.remove("never-existed")
        driver.put("never-existed")
        base = self.frozen_base(driver)
        driver.get(base)
        driver.create("c", base)
        driver.get("c")
        driver.cleanup()
        driver.cleanup()
        assert all(l.mounts == 0 for l in driver.store.all())
        assert not mnt.mounts_under(driver.home)
        with self.mounted(driver, "c") as path:  # usable again after cleanup
            assert (path / "etc" / "conf").exists()

    # -- recovery

    def test_reconcile_after_simulated_crash(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("half-made", base)  # then "crash": record says creating
        driver.store.update("half-made", state=LayerState.CREATING)
        driver.create("orphan", base)  # then "crash": record lost, disk kept
        driver.store.delete("orphan")
        driver.create("half-removed")
        driver.store.update("half-removed", state=LayerState.REMOVING)
        driver.create("kept", base)
        with self.mounted(driver, "kept") as path:
            (path / "kept-file").write_text("kept")
        restarted = reopen(driver)
        try:
            ids = {l.id for l in restarted.store.all()}
            assert ids == {base, "kept"}
            assert restarted._on_disk() == ids
            assert all(l.state is LayerState.READY for l in restarted.store.all())
            with self.mounted(restarted, "kept") as path:
                assert (path / "kept-file").read_text() == "kept"
                assert (path / "etc" / "conf").read_text() == "key = value\n"
        finally:
            restarted.store.close()

    def test_mounts_restored_after_restart(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("w", base)
        wpath, bpath = driver.get("w"), driver.get(base)
        for mp in mnt.mounts_under(driver.home):  # a reboot loses every mount
            mnt.unmount(mp.target, detach=True)
        restarted = reopen(driver)
        try:
            assert (restarted.get("w") / "etc" / "conf").read_text() == "key = value\n"
            assert (restarted.get(base) / "etc" / "conf").read_text() == "key = value\n"
            _expect_erofs(_write, bpath / "x", "x")
            for lid in ("w", "w", base, base):
                restarted.put(lid)
        finally:
            restarted.store.close()
        assert wpath == driver._path(driver.layer("w"))

    @pytest.mark.parametrize("seed", [1, 2, 3])
    def test_kill_9_at_a_random_moment(self, driver: LayerDriver, seed: int) -> None:
        rng = random.Random(seed)
        cls = type(driver)
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_CHILD, cls.__module__, cls.__name__, str(driver.home),
             json.dumps(dict(driver.options))],
            stdout=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        lines: list[str] = []
        target = rng.randint(2, 12)
        while len(lines) < target:
            line = proc.stdout.readline()
            assert line, f"the child stopped early (rc {proc.poll()})"
            lines.append(line)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        lines += rest.splitlines()
        committed: dict[str, int] = {}
        for line in lines:
            what, lid, i = line.split()
            if what == "removed":
                committed.pop(lid)
            else:
                committed[lid] = int(i)
        what, lid, i = lines[-1].split()
        if what == "frozen" and int(i) % 2:  # the kill may have hit the removal that follows
            committed.pop(f"w{i}")
        restarted = reopen(driver)
        try:
            records = restarted.store.all()
            assert all(l.state is LayerState.READY for l in records), records
            assert restarted._on_disk() == {l.id for l in records}, "orphans or missing layers on disk"
            for lid, i in committed.items():
                assert restarted.exists(lid), f"{lid} was committed before the kill and is gone"
                with self.mounted(restarted, lid) as path:
                    for level in range(i + 1):
                        assert (path / f"f{level}-19").read_text() == f"{level}-19" * 100
            restarted.cleanup()
            assert not mnt.mounts_under(restarted.home)
        finally:
            restarted.store.close()

    # -- size, concurrency, IDs, status

    def test_size_enforcement(self, driver: LayerDriver) -> None:
        how = driver.size_enforcement()
        if how.startswith("none"):
            pytest.skip(f"{driver.name} enforces no size here: {how}")
        driver.create("small", opts=CreateOpts(size_bytes=16 << 20))
        with self.mounted(driver, "small") as path:
            with pytest.raises(OSError) as info:
                with open(path / "big", "wb") as f:
                    for _ in range(64):
                        f.write(b"\xab" * (1 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
        driver.create("unlimited")
        with self.mounted(driver, "unlimited") as path:
            (path / "big").write_bytes(b"\xab" * (32 << 20))

    def test_concurrent_creates(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        errors: list[BaseException] = []

        def make(i: int) -> None:
            try:
                driver.create(f"c{i}", base if i % 2 else None)
                with self.mounted(driver, f"c{i}") as path:
                    (path / "mine").write_text(str(i))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in range(8):
            with self.mounted(driver, f"c{i}") as path:
                assert (path / "mine").read_text() == str(i)
                assert (path / "etc").exists() == bool(i % 2)

    def test_rejected_ids_touch_nothing(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("w")
        before = _listing(driver.home)
        records = driver.store.all()
        for bad in BAD_IDS:
            calls = [
                lambda: driver.create(bad), lambda: driver.remove(bad),
                lambda: driver.get(bad), lambda: driver.put(bad), lambda: driver.freeze(bad, "ok2"),
                lambda: driver.freeze("w", bad), lambda: driver.diff(bad),
                lambda: driver.diff_size(bad, base), lambda: driver.resize(bad, 1 << 20),
                lambda: driver.apply_diff(bad, None, io.BytesIO()),
            ]
            if bad is not None:  # None is a valid "no parent"
                calls += [lambda: driver.create("ok-id", bad), lambda: driver.changes("w", bad),
                          lambda: driver.diff("w", bad), lambda: driver.apply_diff("w", bad, io.BytesIO())]
            for call in calls:
                with pytest.raises(InvalidArgument):
                    call()
            assert not driver.exists(bad)  # type: ignore[arg-type]
        assert _listing(driver.home) == before
        assert driver.store.all() == records

    def test_status(self, driver: LayerDriver) -> None:
        base = self.frozen_base(driver)
        driver.create("w1", base)
        driver.create("w2")
        status = driver.status()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in status)
        info = dict(status)
        assert info["driver"] == driver.name
        assert info["size enforcement"] == driver.size_enforcement() and info["size enforcement"]
        assert info["layers"] == "3" and info["frozen layers"] == "1"
        assert info["hidden layers (removal deferred)"] == "0"
        assert int(info["available bytes"]) > 0
