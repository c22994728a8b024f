"""csi.graphdriver.diff.ocitar and the naive differ on their own: names, exact times, binary
xattrs and odd file names, refusing tars that would write outside the root."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import InvalidArgument
from csi.graphdriver.driver import ChangeKind
from csi.graphdriver.diff.naive import NaiveDiffer
from csi.graphdriver.diff.ocitar import DIRECT_MIN, LayerTarApplier, LayerTarWriter, apply_tar, format_ns, parse_ns
from csi.graphdriver.diff.whiteouts import MemberKind, classify, opaque_name, whiteout_name
from csi.graphdriver.vfs import VfsDriver
from conformance import assert_same_tree, open_driver


@pytest.mark.parametrize(("name", "kind", "path"), [
    ("a/b", MemberKind.ENTRY, "a/b"),
    ("./a/./b/", MemberKind.ENTRY, "a/b"),
    ("a/.wh.b", MemberKind.WHITEOUT, "a/b"),
    (".wh.top", MemberKind.WHITEOUT, "top"),
    ("a/.wh..wh..opq", MemberKind.OPAQUE, "a"),
    (".wh..wh..opq", MemberKind.OPAQUE, ""),
    ("a/.wh..wh.plnk", MemberKind.RESERVED, "a/.wh..wh.plnk"),
])
def test_classify(name: str, kind: MemberKind, path: str) -> None:
    meaning = classify(name)
    assert (meaning.kind, meaning.path) == (kind, path)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a\x00b", "a/.wh.", "a/.wh.."])
def test_classify_refuses(name: str) -> None:
    with pytest.raises(InvalidArgument):
        classify(name)


def test_marker_names() -> None:
    assert whiteout_name("a/b/c") == "a/b/.wh.c" and whiteout_name("c") == ".wh.c"
    assert opaque_name("a/b") == "a/b/.wh..wh..opq" and opaque_name("") == ".wh..wh..opq"


@pytest.mark.parametrize("ns", [0, 1, 1_600_000_000_123_456_789, 999_999_999, -1_500_000_000])
def test_times_are_exact(ns: int) -> None:
    info = tarfile.TarInfo("x")
    info.pax_headers["mtime"] = format_ns(ns)
    assert parse_ns(info) == ns


def test_odd_names_binary_xattrs_and_exact_times_survive(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    odd = os.fsdecode(b"caf\xe9 \xff name")  # not UTF-8
    (src / odd).write_bytes(b"content")
    os.setxattr(src / odd, "trusted.bin", bytes(range(256)))
    os.utime(src / odd, ns=(1, 1_700_000_000_000_000_001))
    buf = io.BytesIO()
    with LayerTarWriter(buf) as writer:
        writer.add(src / odd, odd)
    buf.seek(0)
    assert apply_tar(dst, buf) == len(b"content")
    assert_same_tree(src, dst)


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def test_never_writes_through_a_symlink(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    with pytest.raises(InvalidArgument, match="not a directory"):
        apply_tar(root, _tar((_symlink("evil", str(outside)), None), (tarfile.TarInfo("evil/planted"), b"x")))
    hard = tarfile.TarInfo("grab")
    hard.type, hard.linkname = tarfile.LNKTYPE, "evil/secret"
    with pytest.raises(InvalidArgument):
        apply_tar(root, _tar((hard, None)))
    with pytest.raises(InvalidArgument):  # a whiteout through the symlink deletes nothing outside
        apply_tar(root, _tar((tarfile.TarInfo("evil/.wh.secret"), b"")))
    assert os.listdir(outside) == ["secret"] and (outside / "secret").stat().st_nlink == 1


def test_not_a_tar_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        apply_tar(tmp_path, io.BytesIO(b"this is not a tar stream" * 100))


def test_what_a_tar_applies_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore acknowledges volumes on imported layers: every file the tar wrote and every
    directory whose entries it changed (a whiteout's too) is fsynced before apply_tar returns
    (the fsyncs are observed, not replaced: a power cut cannot be made here)."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "gone").write_text("old")
    synced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.add(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sub = tarfile.TarInfo("a/b")
    sub.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("a/b/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../f"
    apply_tar(tmp_path, _tar((tarfile.TarInfo("a/f"), b"data"), (sub, None), (tarfile.TarInfo("a/b/g"), b""),
                             (link, None), (tarfile.TarInfo("keep/.wh.gone"), b"")))
    assert not (tmp_path / "keep" / "gone").exists()
    assert {"a/f", "a/b/g", ".", "a", "a/b", "keep"} <= synced


def test_opaque_keeps_what_the_same_tar_unpacked(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    dir_info = tarfile.TarInfo("d")
    dir_info.type = tarfile.DIRTYPE
    apply_tar(tmp_path, _tar((dir_info, None), (tarfile.TarInfo("d/new"), b"n"),
                             (tarfile.TarInfo("d/.wh..wh..opq"), b"")))
    assert os.listdir(tmp_path / "d") == ["new"]


def test_subclass_stores_deletions_its_own_way(tmp_path: Path) -> None:
    class Recording(LayerTarApplier):
        """Records deletions instead of performing them (as a driver with native whiteouts would)."""

        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.seen: list[tuple[str, str]] = []

        def whiteout(self, rel: str) -> None:
            self.seen.append(("whiteout", rel))

        def opaque(self, rel: str) -> None:
            self.seen.append(("opaque", rel))

    applier = Recording(tmp_path)
    apply_tar(tmp_path, _tar((tarfile.TarInfo("a/.wh.b"), b""), (tarfile.TarInfo("c/.wh..wh..opq"), b"")), applier)
    assert applier.seen == [("whiteout", "a/b"), ("opaque", "c")]


def test_naive_differ_compares_content_when_metadata_matches(ext4_dir: Path) -> None:
    with open_driver(VfsDriver, ext4_dir / "vfs") as drv:
        drv.create("w")
        path = drv.get("w")
        (path / "f").write_text("aaaa")
        os.utime(path / "f", ns=(0, 10**18))
        drv.put("w")
        drv.freeze("w", "base")
        drv.create("x", "base")
        path = drv.get("x")
        (path / "f").write_text("bbbb")  # same size ...
        os.utime(path / "f", ns=(0, 10**18))  # ... and the old mtime
        drv.put("x")
        assert [(c.path, c.kind) for c in NaiveDiffer(drv).changes("x", "base")] == [("/f", ChangeKind.MODIFIED)]
        assert NaiveDiffer(drv, verify_content=False).changes("x", "base") == []
        with pytest.raises(InvalidArgument):  # frozen layers take no diff
            drv.apply_diff("base", None, io.BytesIO())
        with pytest.raises(InvalidArgument):  # the parent must be the layer's own
            drv.apply_diff("x", None, io.BytesIO())


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from csi.graphdriver.diff import naive

    read: list[str] = []
    real = naive._same_content

    def counted(a: Path, b: Path) -> bool:
        read.append(a.name)
        return real(a, b)

    monkeypatch.setattr(naive, "_same_content", counted)
    return read


@pytest.mark.parametrize("driver_name", ["btrfs", "vfs"])
def test_on_btrfs_shared_extents_stand_for_equal_content(btrfs_dir: Path, driver_name: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """btrfs snapshots and vfs's reflinked copies share the parent's extents: an unchanged
    file is not read; a byte overwritten in place (size and mtime kept) is still found."""
    from csi.graphdriver.diff.extents import shares_extents
    from csi.graphdriver.registry import driver_class

    read = _counting_reads(monkeypatch)
    with open_driver(driver_class(driver_name), btrfs_dir / driver_name) as drv:
        drv.create("v0")
        root = drv.get("v0")
        (root / "same").write_bytes(os.urandom(3 << 20))
        (root / "poked").write_bytes(os.urandom(3 << 20))
        os.sync()
        drv.put("v0")
        drv.freeze("v0", "s0")
        drv.create("v1", "s0")
        root = drv.get("v1")
        before = os.stat(root / "poked")
        with open(root / "poked", "r+b") as f:
            f.seek(1 << 20)
            f.write(b"X")
        os.utime(root / "poked", ns=(before.st_atime_ns, before.st_mtime_ns))
        os.sync()
        drv.put("v1")
        drv.freeze("v1", "s1")
        old, new = drv.get("s0"), drv.get("s1")
        try:
            assert shares_extents(new / "same", old / "same")
            assert not shares_extents(new / "poked", old / "poked")
        finally:
            drv.put("s0")
            drv.put("s1")
        changes = {c.path: c.kind for c in drv.changes("s1", "s0")}
        assert changes == {"/poked": ChangeKind.MODIFIED}
        assert "same" not in read and "poked" in read


def test_on_ext4_equal_files_are_read(ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read = _counting_reads(monkeypatch)
    with open_driver(VfsDriver, ext4_dir / "vfs") as drv:
        drv.create("v0")
        (drv.get("v0") / "same").write_bytes(b"z" * 10000)
        drv.put("v0")
        drv.freeze("v0", "s0")
        drv.create("v1", "s0")
        drv.freeze("v1", "s1")
        assert drv.changes("s1", "s0") == [] and read == ["same"]


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("fs", ["ext4_dir", "btrfs_dir", "tmpfs_dir"])
def test_large_files_land_whole_with_or_without_o_direct(fs: str, request: pytest.FixtureRequest) -> None:
    """Files from DIRECT_MIN up are written with O_DIRECT where the file system takes it (whole
    blocks from an aligned buffer, the partial last block buffered) and buffered where not:
    either way every byte lands, at every size around the block and chunk edges, and the
    result survives the applier's fsyncs."""
    root = request.getfixturevalue(fs) / "applied"
    root.mkdir()
    sizes = {"below": DIRECT_MIN - 1, "exact": DIRECT_MIN, "one-more": DIRECT_MIN + 1,
             "tail": 3 * DIRECT_MIN + 123, "blocks": 2 * DIRECT_MIN + 4096, "odd": 5 * DIRECT_MIN - 4095}
    contents = {name: os.urandom(size) for name, size in sizes.items()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o640
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    written = apply_tar(root, buf)
    assert written == sum(sizes.values())
    for name, data in contents.items():
        path = root / name
        assert path.stat().st_size == len(data) and path.read_bytes() == data, name
        assert path.stat().st_mode & 0o777 == 0o640
