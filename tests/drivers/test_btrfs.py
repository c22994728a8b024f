"""The btrfs driver on a real btrfs (loop file): the shared conformance suite, then
btrfs's own checks."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conformance import DriverConformance, open_driver, reopen  # noqa: E402

from csi.host import mount as mnt  # noqa: E402
from csi.errors import IncompatibleFilesystem, InvalidArgument, OutOfRange, Unsupported  # noqa: E402
from csi.graphdriver.btrfs import ioctl as ioc  # noqa: E402
from csi.graphdriver.driver import CreateOpts, Layer, LayerKind
from csi.graphdriver.layered import LayerState  # noqa: E402
from csi.graphdriver.btrfs.driver import BtrfsDriver  # noqa: E402


class TestBtrfs(DriverConformance):
    max_depth = 128

    @pytest.fixture
    def driver(self, btrfs_dir: Path) -> Iterator[BtrfsDriver]:
        with open_driver(BtrfsDriver, btrfs_dir / "btrfs") as drv:
            yield drv  # type: ignore[misc]



def test_state_machine_btrfs_against_vfs(btrfs_dir: Path, ext4_dir: Path) -> None:
    """Random file operations, freezes (read-only snapshots), clones (writable snapshots)
    and diff round trips on btrfs, compared step by step with vfs on ext4."""
    from test_statemachine import run_driver_state_machine

    run_driver_state_machine(BtrfsDriver, btrfs_dir, ext4_dir)


# --------------------------------------------------------------------------- btrfs's own checks

def _info(path: Path) -> ioc.SubvolumeInfo:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return ioc.subvolume_info(fd)
    finally:
        os.close(fd)


def _limit(path: Path) -> ioc.QgroupLimit | None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return ioc.qgroup_limit(fd, ioc.qgroup_id(ioc.subvolume_info(fd).id))
    finally:
        os.close(fd)


def _exclusive(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        usage = ioc.qgroup_usage(fd, ioc.qgroup_id(ioc.subvolume_info(fd).id))
    finally:
        os.close(fd)
    assert usage is not None
    return usage.exclusive


def _progs(*args: str) -> str:
    """btrfs-progs, as an independent cross-check of what the driver did by ioctl."""
    return subprocess.run(["btrfs", *args], check=True, capture_output=True, text=True).stdout


def _sync(path: Path) -> None:
    """Commit the transaction so qgroup counters and space figures are current."""
    _progs("filesystem", "sync", str(path))


def _progs_readonly(path: Path) -> bool:
    return _progs("property", "get", "-ts", str(path), "ro").strip() == "ro=true"


def _progs_subvolumes_under(mount_point: Path, directory: Path) -> set[str]:
    """Names of live subvolumes directly in ``directory``, as ``btrfs subvolume list`` sees them."""
    rel = str(directory.relative_to(mount_point)) + "/"
    names = set()
    for line in _progs("subvolume", "list", str(mount_point)).splitlines():
        path = line.split(" path ", 1)[1]
        if path.startswith(rel) and "/" not in path[len(rel):]:
            names.add(path[len(rel):])
    return names


def _space_used(mount_point: Path) -> dict[str, int]:
    """Bytes used per block-group type (Data, Metadata, ...) from ``btrfs filesystem df``."""
    used = {}
    for line in _progs("filesystem", "df", "-b", str(mount_point)).splitlines():
        kind, _, rest = line.partition(",")
        used[kind.strip()] = int(rest.split("used=")[1].split()[0])
    return used


def _fill(path: Path, mib: int, name: str = "data") -> None:
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path / name, "wb") as f:
        for _ in range(mib):
            f.write(block)
        os.fsync(f.fileno())


def _write_until_error(path: Path, mib: int) -> tuple[int, OSError | None]:
    """Write up to ``mib`` MiB into a new file; (bytes written, the error if one came)."""
    written = 0
    try:
        with open(path, "wb") as f:
            for i in range(mib):
                f.write(b"\xcd" * (1 << 20))
                written += 1 << 20
                if i % 4 == 3:
                    f.flush()
                    os.fsync(f.fileno())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return written, exc
    return written, None


@pytest.fixture
def drv(btrfs_dir: Path) -> Iterator[BtrfsDriver]:
    with open_driver(BtrfsDriver, btrfs_dir / "btrfs") as d:
        yield d  # type: ignore[misc]


class TestSupport:
    def test_refuses_a_home_on_ext4(self, ext4_dir: Path) -> None:
        home = ext4_dir / "not" / "yet" / "there"
        with pytest.raises(IncompatibleFilesystem, match=r"is on ext4, not btrfs"):
            BtrfsDriver(home)
        assert not (ext4_dir / "not").exists()

    def test_accepts_a_missing_home_below_btrfs(self, btrfs_dir: Path) -> None:
        with open_driver(BtrfsDriver, btrfs_dir / "a" / "b" / "home") as d:
            d.create("w")
            assert ioc.is_subvolume_root(d.get("w"))
            d.put("w")

    @pytest.mark.parametrize("options", [{"btrfs.nonsense": "1"}, {"btrfs.quota": "maybe"}])
    def test_bad_options_refused(self, btrfs_dir: Path, options: dict[str, str]) -> None:
        with pytest.raises(InvalidArgument):
            BtrfsDriver(btrfs_dir / "home", options)
        assert not (btrfs_dir / "home").exists()

    def test_options_of_other_drivers_ignored(self, btrfs_dir: Path) -> None:
        with open_driver(BtrfsDriver, btrfs_dir / "home", {"overlay.anything": "x"}) as d:
            assert d.quota.enforced

    def test_enables_quota_on_a_fresh_filesystem(self, scratch_root: Path) -> None:
        image, target = scratch_root / "fresh.img", scratch_root / "fresh"
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True)
        loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                              capture_output=True, text=True).stdout.strip()
        target.mkdir()
        try:
            mnt.mount(mnt.Mount("btrfs", loop, ()), target)
            fd = os.open(target, os.O_RDONLY)
            try:
                assert ioc.quota_status(fd) is None
                with open_driver(BtrfsDriver, target / "home") as d:
                    status = ioc.quota_status(fd)
                    assert status is not None and not status.rescanning and not status.simple
                    assert dict(d.status())["btrfs quota"] == "full qgroup accounting, consistent"
            finally:
                os.close(fd)
            assert "qgroupid" in _progs("qgroup", "show", str(target)).lower()
        finally:
            mnt.unmount(target, detach=True)
            subprocess.run(["losetup", "-d", loop], check=False)
            image.unlink()


class TestSubvolumes:
    @pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", "", "a\x00b", "x" * 4040])
    def test_ioctl_layer_refuses_path_like_names(self, btrfs_dir: Path, name: str) -> None:
        fd = os.open(btrfs_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as info:
                ioc.create_subvolume(fd, name)
            assert info.value.errno == errno.EINVAL
        finally:
            os.close(fd)
        assert os.listdir(btrfs_dir) == [] and os.listdir(btrfs_dir.parent).count("x") == 0

    def test_layers_are_subvolumes_and_frozen_ones_read_only(self, drv: BtrfsDriver) -> None:
        drv.create("w")
        wpath = drv.get("w")
        (wpath / "f").write_text("x")
        drv.freeze("w", "snap")
        drv.create("child", "snap")
        spath, cpath = drv.get("snap"), drv.get("child")
        assert wpath == drv.subvolumes / "w" and not mnt.is_mount_point(wpath)  # no mount needed
        w, s, c = _info(wpath), _info(spath), _info(cpath)
        assert not w.readonly and s.readonly and not c.readonly
        assert (_progs_readonly(wpath), _progs_readonly(spath), _progs_readonly(cpath)) == (False, True, False)
        assert w.parent_uuid == bytes(16)  # created empty, not a snapshot
        assert s.parent_uuid == w.uuid and c.parent_uuid == s.uuid  # snapshot lineage
        for lid in ("w", "snap", "child"):
            drv.put(lid)

    def test_freeze_copies_no_data(self, drv: BtrfsDriver, btrfs_mount: Path) -> None:
        """Freezing 1 MiB and 256 MiB layers costs the same: no data extent is written
        (Data used is unchanged, the snapshot owns no exclusive bytes), whether the
        layer is held (get) or not. Measured as space, not time."""
        growth = {}
        for mib, held in ((1, False), (256, False), (256, True)):
            wid, fid = f"w{mib}{held:d}", f"f{mib}{held:d}"
            drv.create(wid)
            path = drv.get(wid)
            _fill(path, mib)
            if not held:
                drv.put(wid)
            _sync(btrfs_mount)
            before = _space_used(btrfs_mount)
            drv.freeze(wid, fid)
            _sync(btrfs_mount)
            after = _space_used(btrfs_mount)
            growth[(mib, held)] = {k: after[k] - before[k] for k in ("Data", "Metadata")}
            fpath = drv._path(drv.layer(fid))
            assert _exclusive(fpath) < (1 << 20), "the snapshot shares every extent with its source"
            assert (fpath / "data").stat().st_size == mib << 20
            if held:
                drv.put(wid)
        for key, delta in growth.items():
            assert delta["Data"] < (1 << 20), f"freeze of {key} wrote data: {growth}"
            assert delta["Metadata"] < (1 << 20), f"freeze of {key} grew metadata by more than O(1): {growth}"

    def test_remove_deletes_subvolumes_and_defers_with_children(self, drv: BtrfsDriver, btrfs_mount: Path) -> None:
        drv.create("w")
        drv.freeze("w", "base")
        drv.create("child", "base")
        assert _progs_subvolumes_under(btrfs_mount, drv.subvolumes) == {"w", "base", "child"}
        drv.remove("base")
        drv.remove("w")
        assert _progs_subvolumes_under(btrfs_mount, drv.subvolumes) == {"base", "child"}
        assert ioc.is_subvolume_root(drv.subvolumes / "base") and not drv.exists("base")
        drv.remove("child")
        assert _progs_subvolumes_under(btrfs_mount, drv.subvolumes) == set()
        assert os.listdir(drv.subvolumes) == [] and drv.store.all() == []

    def test_remove_a_layer_holding_nested_subvolumes(self, drv: BtrfsDriver, btrfs_mount: Path) -> None:
        drv.create("w")
        path = drv.get("w")
        (path / "dir").mkdir()
        _progs("subvolume", "create", str(path / "dir" / "nested"))
        _progs("subvolume", "create", str(path / "dir" / "nested" / "deeper"))
        (path / "dir" / "nested" / "deeper" / "f").write_text("inside")
        drv.put("w")
        drv.remove("w")
        assert not (drv.subvolumes / "w").exists()
        assert _progs_subvolumes_under(btrfs_mount, drv.subvolumes) == set()
        assert not [l for l in _progs("subvolume", "list", str(btrfs_mount)).splitlines()
                    if str(drv.subvolumes.relative_to(btrfs_mount)) in l]


    def test_subvolumes_of_a_directory_from_one_search(self, drv: BtrfsDriver) -> None:
        """The root-tree search that start-up uses agrees with opening each subvolume, and
        lists only the subvolumes whose root is an entry of that directory."""
        drv.create("a")
        drv.create("b", opts=CreateOpts(size_bytes=16 << 20))
        drv.freeze("b", "f")
        (drv.subvolumes / "a" / "plain").mkdir()
        _progs("subvolume", "create", str(drv.subvolumes / "a" / "nested"))
        fd = os.open(drv.subvolumes, os.O_RDONLY | os.O_DIRECTORY)
        try:
            found = ioc.subvolumes_in(fd)
            limits = ioc.qgroup_limits(fd)
        finally:
            os.close(fd)
        assert found == {name: _info(drv.subvolumes / name).id for name in ("a", "b", "f")}
        assert limits[ioc.qgroup_id(found["b"])] == _limit(drv.subvolumes / "b")
        assert limits[ioc.qgroup_id(found["b"])].max_referenced == 16 << 20


class TestQgroups:
    def test_status_names_the_limit(self, drv: BtrfsDriver) -> None:
        assert drv.size_enforcement().startswith("btrfs qgroups (limit on referenced bytes")
        assert dict(drv.status())["btrfs quota"].startswith("full qgroup accounting")

    def test_limit_enforced_with_edquot_and_raised_by_resize(self, drv: BtrfsDriver, btrfs_mount: Path) -> None:
        drv.create("vol", opts=CreateOpts(size_bytes=32 << 20))
        path = drv.get("vol")
        try:
            assert _limit(path) == ioc.QgroupLimit(max_referenced=32 << 20, max_exclusive=None)
            written, err = _write_until_error(path / "first", 64)
            assert err is not None and err.errno == errno.EDQUOT, err
            assert 16 << 20 <= written <= 32 << 20
            _sync(btrfs_mount)
            used = drv.usage("vol")
            assert used is not None and 16 << 20 <= used <= 32 << 20
            drv.resize("vol", 128 << 20)
            assert _limit(path) == ioc.QgroupLimit(max_referenced=128 << 20, max_exclusive=None)
            assert "128.00MiB" in _progs("qgroup", "show", "-r", str(path))
            assert drv.layer("vol").size_bytes == 128 << 20
            written, err = _write_until_error(path / "second", 64)
            assert err is None and written == 64 << 20
            written, err = _write_until_error(path / "third", 64)
            assert err is not None and err.errno == errno.EDQUOT
            with pytest.raises(InvalidArgument):
                drv.resize("vol", 64 << 20)  # no shrinking
            assert _limit(path) == ioc.QgroupLimit(max_referenced=128 << 20, max_exclusive=None)
        finally:
            drv.put("vol")

    def test_limits_of_frozen_layers_and_children(self, drv: BtrfsDriver, btrfs_mount: Path) -> None:
        drv.create("vol", opts=CreateOpts(size_bytes=64 << 20))
        _fill(drv.get("vol"), 8)
        drv.put("vol")
        drv.freeze("vol", "snap")
        _sync(btrfs_mount)
        assert _limit(drv.subvolumes / "snap") in (None, ioc.QgroupLimit(None, None))
        drv.create("restore", "snap", CreateOpts(size_bytes=16 << 20))
        assert _limit(drv.subvolumes / "restore") == ioc.QgroupLimit(max_referenced=16 << 20, max_exclusive=None)
        drv.create("free", "snap")  # no size: the source's inherited limit is cleared
        assert _limit(drv.subvolumes / "free") in (None, ioc.QgroupLimit(None, None))
        _fill(drv.subvolumes / "free", 100, "more")
        with pytest.raises(OutOfRange, match="references"):
            drv.create("too-small", "snap", CreateOpts(size_bytes=4 << 20))
        assert drv.store.get("too-small") is None
        assert sorted(os.listdir(drv.subvolumes)) == ["free", "restore", "snap", "vol"]
        with pytest.raises(InvalidArgument):
            drv.resize("snap", 1 << 30)

    def test_quota_off_by_option(self, btrfs_dir: Path) -> None:
        with open_driver(BtrfsDriver, btrfs_dir / "home", {"btrfs.quota": "off"}) as d:
            assert d.size_enforcement() == "none (btrfs quota disabled by option btrfs.quota=off)"
            d.create("w", opts=CreateOpts(size_bytes=1 << 20))
            assert _limit(d.subvolumes / "w") in (None, ioc.QgroupLimit(None, None))
            with pytest.raises(Unsupported):
                d.resize("w", 2 << 20)
            assert d.usage("w") is None


class TestRecovery:
    def test_stale_temp_subvolumes_removed_at_start(self, drv: BtrfsDriver, btrfs_mount: Path) -> None:
        drv.create("kept")
        _progs("subvolume", "create", str(drv.subvolumes / ".tmp-ghost"))
        _progs("subvolume", "snapshot", "-r", str(drv.subvolumes / "kept"), str(drv.subvolumes / ".tmp-ro-ghost"))
        (drv.subvolumes / ".tmp-plain").mkdir()
        restarted = reopen(drv)
        try:
            assert os.listdir(drv.subvolumes) == ["kept"]
            assert _progs_subvolumes_under(btrfs_mount, drv.subvolumes) == {"kept"}
        finally:
            restarted.store.close()

    def test_interrupted_freeze_with_complete_snapshot_is_finished(self, drv: BtrfsDriver) -> None:
        drv.create("w", opts=CreateOpts(size_bytes=64 << 20))
        (drv.get("w") / "f").write_text("frozen content")
        drv.put("w")
        drv.store.insert(Layer(id="snap", parent=None, kind=LayerKind.FROZEN, origin="w"))
        _progs("subvolume", "snapshot", "-r", str(drv.subvolumes / "w"), str(drv.subvolumes / ".tmp-snap"))
        restarted = reopen(drv)
        try:
            assert restarted.layer("snap").frozen and restarted.layer("snap").state is LayerState.READY
            assert sorted(os.listdir(restarted.subvolumes)) == ["snap", "w"]
            assert (restarted.get("snap") / "f").read_text() == "frozen content"
            assert _info(restarted.subvolumes / "snap").readonly
            assert _limit(restarted.subvolumes / "snap") in (None, ioc.QgroupLimit(None, None))
            restarted.put("snap")
        finally:
            restarted.store.close()

    def test_rename_and_limit_lost_by_a_power_cut_are_repaired(self, drv: BtrfsDriver) -> None:
        """A power cut may lose what follows the snapshot ioctl's commit (the rename to
        the final name, the qgroup limit): here both are undone by hand, as the disk
        would look after such a cut, and the restart must put them back."""
        drv.create("w", opts=CreateOpts(size_bytes=64 << 20))
        (drv.get("w") / "f").write_text("kept")
        drv.put("w")
        drv.freeze("w", "snap")
        drv.create("clone", "snap", CreateOpts(size_bytes=32 << 20))
        for lid in ("snap", "clone"):
            os.rename(drv.subvolumes / lid, drv.subvolumes / f".tmp-{lid}")
        ioc_fd = os.open(drv.subvolumes / "w", os.O_RDONLY)
        try:
            ioc.set_qgroup_limit(ioc_fd, ioc.qgroup_id(ioc.subvolume_info(ioc_fd).id), max_referenced=None)
        finally:
            os.close(ioc_fd)
        restarted = reopen(drv)
        try:
            assert sorted(os.listdir(restarted.subvolumes)) == ["clone", "snap", "w"]
            assert {l.id for l in restarted.layers()} == {"clone", "snap", "w"}
            assert (restarted.subvolumes / "clone" / "f").read_text() == "kept"
            assert _info(restarted.subvolumes / "snap").readonly
            assert _limit(restarted.subvolumes / "w") == ioc.QgroupLimit(max_referenced=64 << 20, max_exclusive=None)
            assert _limit(restarted.subvolumes / "clone") == ioc.QgroupLimit(max_referenced=32 << 20, max_exclusive=None)
        finally:
            restarted.store.close()

    def test_an_empty_layer_lost_in_a_power_cut_is_made_again(self, drv: BtrfsDriver) -> None:
        """A layer created without parent is an empty subvolume no transaction commits before
        its record is acknowledged: a power cut may keep the record and lose the subvolume.
        The restart makes it again, empty, with its limit and compression; a layer with
        content (committed by the snapshot ioctl) never needs this. (The cut is modelled by
        deleting the subvolume; the power-cut lane in tests/qemu cuts real power.)"""
        drv.create("lost", opts=CreateOpts(size_bytes=48 << 20, properties={"compression": "zstd"}))
        drv.create("w")
        (drv.get("w") / "f").write_text("kept")
        drv.put("w")
        drv.freeze("w", "snap")
        drv.create("child", "snap")
        fd = os.open(drv.subvolumes, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ioc.destroy_subvolume(fd, "lost")
        finally:
            os.close(fd)
        restarted = reopen(drv)
        try:
            assert restarted.exists("lost") and os.listdir(restarted.get("lost")) == []
            restarted.put("lost")
            assert ioc.is_subvolume_root(restarted.subvolumes / "lost")
            assert _limit(restarted.subvolumes / "lost") == ioc.QgroupLimit(max_referenced=48 << 20, max_exclusive=None)
            assert ioc.get_compression(restarted.subvolumes / "lost") == "zstd"
            assert (restarted.get("child") / "f").read_text() == "kept"
            restarted.put("child")
        finally:
            restarted.store.close()

    def test_a_compression_property_a_power_cut_lost_is_set_again(self, drv: BtrfsDriver) -> None:
        drv.create("w", opts=CreateOpts(properties={"compression": "lzo"}))
        os.removexattr(drv.subvolumes / "w", ioc.COMPRESSION_XATTR)
        restarted = reopen(drv)
        try:
            assert ioc.get_compression(restarted.subvolumes / "w") == "lzo"
        finally:
            restarted.store.close()

    def test_interrupted_create_and_freeze_rolled_back(self, drv: BtrfsDriver) -> None:
        drv.create("w")
        drv.store.insert(Layer(id="half", parent=None, kind=LayerKind.WRITABLE))
        _progs("subvolume", "create", str(drv.subvolumes / ".tmp-half"))
        drv.store.insert(Layer(id="snap", parent=None, kind=LayerKind.FROZEN, origin="w"))
        _progs("subvolume", "snapshot", str(drv.subvolumes / "w"), str(drv.subvolumes / ".tmp-snap"))  # not ro: unfinished
        restarted = reopen(drv)
        try:
            assert {l.id for l in restarted.store.all()} == {"w"}
            assert os.listdir(restarted.subvolumes) == ["w"]
        finally:
            restarted.store.close()

    @pytest.mark.parametrize("seed", range(4))
    def test_kill_9_leaves_no_stale_subvolume(self, drv: BtrfsDriver, btrfs_mount: Path, seed: int) -> None:
        """kill -9 a process that creates, fills, freezes (held and not) and removes
        layers at a random moment; after a restart every record is ready, the
        subvolumes btrfs lists are exactly the records, frozen ones are read-only, and
        every layer reported committed holds its content."""
        rng = random.Random(seed)
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(drv.home)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # started: from here on every moment is fair game
        assert first.endswith("\n"), f"the child failed to start (rc {proc.wait()})"
        time.sleep(rng.random() * 1.0)
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        lines = _whole_lines(first + rest)
        committed: dict[str, str] = {}
        for line in lines:
            what, lid, content = line.split()
            if what == "removed":
                committed.pop(lid)
            else:
                committed[lid] = content
        what, lid, _content = lines[-1].split()
        index = int(lid[1:])
        # after "frozen f<odd>" the child was removing w<odd>: either outcome is right
        removal_in_flight = f"w{index}" if what == "frozen" and index % 2 else None
        restarted = reopen(drv)
        try:
            records = restarted.store.all()
            assert all(l.state is LayerState.READY for l in records), records
            ids = {l.id for l in records}
            assert set(os.listdir(restarted.subvolumes)) == ids, "stale or missing subvolumes"
            assert _progs_subvolumes_under(btrfs_mount, restarted.subvolumes) == ids
            for layer in records:
                assert _info(restarted.subvolumes / layer.id).readonly == layer.frozen
            for lid, content in committed.items():
                if lid == removal_in_flight and not restarted.exists(lid):
                    continue
                assert restarted.exists(lid), f"{lid} was committed before the kill and is gone"
                path = restarted.get(lid)
                assert (path / "content").read_text() == content
                restarted.put(lid)
        finally:
            restarted.store.close()


def _whole_lines(output: str) -> list[str]:
    """The lines a killed child printed whole. A kill can land in the middle of a line; a
    last line without its newline is incomplete (its fields may be cut short, or look whole
    with a truncated value), so it reports nothing and is dropped."""
    *whole, _unterminated = output.split("\n")
    return whole


def test_a_line_cut_by_the_kill_reports_nothing() -> None:
    assert _whole_lines("created w0 content-0\nfrozen f0 content-0\n") == ["created w0 content-0",
                                                                            "frozen f0 content-0"]
    assert _whole_lines("created w0 content-0\nfrozen f0 cont") == ["created w0 content-0"]
    assert _whole_lines("created w0 content-0\ncreated w1") == ["created w0 content-0"]
    assert _whole_lines("") == []


_CHILD = r"""
import sys
from csi.graphdriver.btrfs.driver import BtrfsDriver
from csi.graphdriver.driver import CreateOpts
drv = BtrfsDriver(sys.argv[1])
parent = None
for i in range(100_000):
    w = f"w{i}"
    drv.create(w, parent, CreateOpts(size_bytes=(64 << 20) if i % 3 else None))
    path = drv.get(w)
    with open(f"{path}/content", "w") as f:
        f.write(f"content-{i}")
    with open(f"{path}/bulk", "wb") as f:
        f.write(b"x" * ((i % 5) << 20))
    held = i % 2 == 0
    if not held:
        drv.put(w)
    print("created", w, f"content-{i}", flush=True)
    drv.freeze(w, f"f{i}")
    print("frozen", f"f{i}", f"content-{i}", flush=True)
    if held:
        drv.put(w)
    if i % 2:
        drv.remove(w)
        print("removed", w, "-", flush=True)
    parent = f"f{i}"
"""
