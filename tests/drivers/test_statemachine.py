"""Random file operations, freezes and clones on a driver, against vfs as the reference.

:func:`run_driver_state_machine` is the reusable part: give it a function that opens
the driver under test on a fresh home, a directory for those homes, and a directory on
which the reference vfs driver lives. Hypothesis then drives both with the same steps:

* file operations inside a writable layer: write, append, truncate, mkdir, rm -r,
  rename, symlink, hard link, chmod, unlink, setxattr — each must succeed on both or
  fail on both with the same errno;
* ``freeze`` of a writable layer (mounted or not; a second rule freezes mounted only, so a
  layer is often frozen while mounted several times with changes between), ``clone`` (a writable child of a
  frozen layer), ``remove`` of a writable layer, ``remount`` (put + get);
* a diff round trip: ``apply_diff(diff(w, parent))`` onto a fresh child of the parent
  reproduces ``w`` exactly, mtimes included.

After every step every visible layer must look the same in both drivers (type, mode,
content, link targets, xattrs, hard-link groups; not timestamps, which the two drivers
take at different instants). Within the driver under test, a new frozen layer or clone
must equal its source exactly, timestamps included. Each example uses fresh homes and removes them afterwards. A failure is reported
unshrunk (shrinking replays real mounts and copies for minutes); set
``STRATA_HYPOTHESIS_SHRINK=1`` to shrink it while debugging.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from unittest import mock
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule,
                                 run_state_machine_as_test)

from conformance import assert_same_tree, populate
from csi.host import mount as mnt
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.vfs import VfsDriver

MakeDriver = Callable[[Path], LayerDriver]
# (driver under test, layer, path, follow its last symlink), asked before an operation on
# that path: None, or a probe to call after it, which names the file (relative to the
# layer's root) the operation copied up from a lower layer while it had other hard links
# (overlay without its index gives that name a new inode of its own)
CopyUp = Callable[[LayerDriver, str, str, bool], "Callable[[], str | None] | None"]

PATHS = st.sampled_from(["a", "d", "d/a", "d/e", "d/e/a", "etc", "etc/conf", "data", "data/deep", "data/owned",
                         "hard-a", "hard-b", "link-rel", "replace-me", "replace-me/old1", "bin/tool"])
DATA = st.binary(max_size=96)
BIG = st.sampled_from([70_000, 300_000])  # sizes, so that a failure report stays readable
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o700, 0o1777])
XATTRS = st.sampled_from(["user.a", "user.b", "trusted.t"])


def _rename(src: Path, dst: Path, *, by_copy: bool = False) -> bool:
    """``mv``: rename, or copy and delete where the kernel says EXDEV (overlay dirs);
    ``by_copy`` takes the copying way at once. True when it copied."""
    try:
        if by_copy:
            raise OSError(errno.EXDEV, "as the driver under test", str(src))
        os.rename(src, dst)
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with mock.patch.object(os, "rename", side_effect=OSError(errno.EXDEV, "copying", str(src))):
            shutil.move(src, dst)  # shutil.move tries os.rename first
        return True


def _break_hard_link(root: Path, rel: str) -> None:
    """Give ``rel`` a new inode of its own, the same in all else (what a copy-up does)."""
    path, tmp = root / rel, root / (rel + ".sm-copy-up")
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(path), tmp)
    else:
        shutil.copy2(path, tmp, follow_symlinks=False)
    os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    os.rename(tmp, path)


def _rm_r(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _write(path: Path, data: bytes, mode: str) -> None:
    with open(path, mode) as f:
        f.write(data)


def _close(drv: LayerDriver) -> None:
    try:
        drv.cleanup()
    finally:
        for mp in mnt.mounts_under(drv.home):
            mnt.unmount(mp.target, detach=True)
        drv.store.close()
        shutil.rmtree(drv.home, ignore_errors=True)


def driver_state_machine(make_driver: MakeDriver, homes: Path, reference_homes: Path,
                         copy_up: CopyUp | None = None) -> type[RuleBasedStateMachine]:
    """A state machine class comparing ``make_driver`` with vfs (see module docstring).
    ``copy_up``: where the driver under test breaks hard links of lower files on copy-up,
    it says which, and the reference breaks the same link before the operation."""

    class DriverAgainstVfs(RuleBasedStateMachine):
        writable = Bundle("writable")
        frozen = Bundle("frozen")

        def __init__(self) -> None:
            super().__init__()
            name = uuid.uuid4().hex[:10]
            self.test = make_driver(homes / f"sm-{name}")
            self.ref: LayerDriver = VfsDriver(reference_homes / f"sm-ref-{name}")
            self.counter = 0
            self.live: set[str] = set()

        def teardown(self) -> None:
            for drv in (self.test, self.ref):
                _close(drv)

        def _new_id(self, prefix: str) -> str:
            self.counter += 1
            return f"{prefix}{self.counter}"

        def _both(self, layer_id: str, action: Callable[[Path], None], *copied_up: tuple[str, bool],
                  test_first: bool = False) -> None:
            """``action`` on both (the reference first, unless ``test_first``); ``copied_up``:
            the (path, follow its last symlink) it may copy up in the driver under test: then
            the driver under test goes first, and a hard link it broke so is broken in the
            reference before the same action there."""
            probes = [p for p in (copy_up(self.test, layer_id, rel, follow) for rel, follow in copied_up)
                      if p is not None] if copy_up is not None else []
            test_first = test_first or bool(probes)
            outcomes = []
            for drv in ((self.test, self.ref) if test_first else (self.ref, self.test)):
                root = drv.get(layer_id)
                try:
                    if drv is self.ref:
                        for broken in filter(None, (probe() for probe in probes)):
                            _break_hard_link(root, broken)
                    action(root)
                    outcomes.append(None)
                except OSError as exc:
                    outcomes.append(exc.errno)
                finally:
                    drv.put(layer_id)
            ref_errno, test_errno = outcomes[::-1] if test_first else outcomes
            assert ref_errno == test_errno, f"reference errno {ref_errno}, driver errno {test_errno}"

        # -- layers

        @initialize(target=writable)
        def populated(self) -> str:
            """The first layer holds conformance's rich tree (xattrs, hard links, modes...)."""
            lid = self._new_id("w")
            for drv in (self.ref, self.test):
                drv.create(lid)
                root = drv.get(lid)
                try:
                    populate(root, device_nodes=False)
                    (root / "sparse").unlink()  # 8 MiB to hash at every step: not worth it
                finally:
                    drv.put(lid)
            self.live.add(lid)
            return lid

        @rule(target=writable)
        def create_empty(self) -> str:
            lid = self._new_id("w")
            for drv in (self.ref, self.test):
                drv.create(lid)
            self.live.add(lid)
            return lid

        @rule(target=frozen, layer=writable, mounted=st.booleans())
        def freeze(self, layer: str, mounted: bool) -> str:
            fid = self._new_id("f")
            for drv in (self.ref, self.test):
                if mounted:
                    drv.get(layer)
                try:
                    drv.freeze(layer, fid)
                finally:
                    if mounted:
                        drv.put(layer)
            self._same_layers(layer, fid)
            self.live.add(fid)
            return fid

        @rule(target=frozen, layer=writable)
        def freeze_mounted(self, layer: str) -> str:
            """Mounted freezes again and again, with file operations between them: overlay
            stacks each one's changes on the last (an incremental copy of the upper dir)."""
            return self.freeze(layer, True)

        @rule(target=writable, parent=frozen)
        def clone(self, parent: str) -> str:
            lid = self._new_id("w")
            for drv in (self.ref, self.test):
                drv.create(lid, parent)
            self._same_layers(parent, lid)
            self.live.add(lid)
            return lid

        def _same_layers(self, source: str, copy: str) -> None:
            """In the driver under test alone: a freeze or clone is an exact copy, mtimes
            included (this also catches faults that vfs, the reference, shares)."""
            a, b = self.test.get(source), self.test.get(copy)
            try:
                assert_same_tree(a, b)
            finally:
                self.test.put(source)
                self.test.put(copy)

        @rule(layer=consumes(writable))
        def remove(self, layer: str) -> None:
            for drv in (self.ref, self.test):
                drv.remove(layer)
            self.live.discard(layer)

        @rule(layer=writable)
        def diff_round_trip(self, layer: str) -> None:
            parent = self.test.layer(layer).parent
            copy = self._new_id("rt")
            self.test.create(copy, parent)
            try:
                self.test.apply_diff(copy, parent, self.test.diff(layer, parent))
                a, b = self.test.get(layer), self.test.get(copy)
                try:
                    assert_same_tree(a, b)
                finally:
                    self.test.put(layer)
                    self.test.put(copy)
            finally:
                self.test.remove(copy)

        # -- file operations

        @rule(layer=writable, path=PATHS, data=DATA)
        def write(self, layer: str, path: str, data: bytes) -> None:
            self._both(layer, lambda r: _write(r / path, data, "wb"), (path, True))

        @rule(layer=writable, path=PATHS, size=BIG)
        def write_big(self, layer: str, path: str, size: int) -> None:
            self._both(layer, lambda r: _write(r / path, b"z" * size, "wb"), (path, True))

        @rule(layer=writable, path=PATHS, data=DATA)
        def append(self, layer: str, path: str, data: bytes) -> None:
            self._both(layer, lambda r: _write(r / path, data, "ab"), (path, True))

        @rule(layer=writable, path=PATHS, size=st.integers(0, 100_000))
        def truncate(self, layer: str, path: str, size: int) -> None:
            self._both(layer, lambda r: os.truncate(r / path, size), (path, True))

        @rule(layer=writable, path=PATHS)
        def mkdir(self, layer: str, path: str) -> None:
            self._both(layer, lambda r: os.mkdir(r / path))

        @rule(layer=writable, path=PATHS)
        def rm_r(self, layer: str, path: str) -> None:
            self._both(layer, lambda r: _rm_r(r / path))

        @rule(layer=writable, src=PATHS, dst=PATHS)
        def rename(self, layer: str, src: str, dst: str) -> None:
            copied = []  # the driver under test first: the reference copies where it had to
            self._both(layer, lambda r: copied.append(_rename(r / src, r / dst, by_copy=bool(copied and copied[0]))),
                       (src, False), test_first=True)

        @rule(layer=writable, points_to=st.sampled_from(["a", "../x", "/etc/passwd", "d/a"]), path=PATHS)
        def symlink(self, layer: str, points_to: str, path: str) -> None:
            self._both(layer, lambda r: os.symlink(points_to, r / path))

        @rule(layer=writable, src=PATHS, dst=PATHS)
        def hardlink(self, layer: str, src: str, dst: str) -> None:
            self._both(layer, lambda r: os.link(r / src, r / dst, follow_symlinks=False), (src, False))

        @rule(layer=writable, path=PATHS, mode=MODES)
        def chmod(self, layer: str, path: str, mode: int) -> None:
            self._both(layer, lambda r: os.chmod(r / path, mode, follow_symlinks=False)
                       if not (r / path).is_symlink() else None, (path, False))

        @rule(layer=writable, path=PATHS)
        def unlink(self, layer: str, path: str) -> None:
            self._both(layer, lambda r: os.unlink(r / path))

        @rule(layer=writable, path=PATHS, name=XATTRS, value=st.binary(max_size=32))
        def setxattr(self, layer: str, path: str, name: str, value: bytes) -> None:
            self._both(layer, lambda r: os.setxattr(r / path, name, value, follow_symlinks=False), (path, False))

        # -- the invariant

        @invariant()
        def same_content(self) -> None:
            for lid in sorted(self.live):
                assert self.test.exists(lid) and self.ref.exists(lid)
                ref_root, test_root = self.ref.get(lid), self.test.get(lid)
                try:
                    assert_same_tree(ref_root, test_root, mtimes=False)
                finally:
                    self.ref.put(lid)
                    self.test.put(lid)

    return DriverAgainstVfs


def run_driver_state_machine(make_driver: MakeDriver, homes: Path, reference_homes: Path, *,
                             max_examples: int = 12, steps: int = 30, copy_up: CopyUp | None = None) -> None:
    """Run the comparison (see module docstring); bounded to about half a minute."""
    machine = driver_state_machine(make_driver, homes, reference_homes, copy_up)
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("STRATA_HYPOTHESIS_SHRINK") == "1":  # minutes on real filesystems: opt in
        phases.append(Phase.shrink)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None, derandomize=True,
        phases=phases, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    ))


def test_vfs_on_btrfs_against_vfs_on_ext4(btrfs_dir: Path, ext4_dir: Path) -> None:
    """vfs on btrfs copies by reflink; the reference on ext4 copies bytes."""
    run_driver_state_machine(VfsDriver, btrfs_dir, ext4_dir)
