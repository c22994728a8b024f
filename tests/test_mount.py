"""csi.host.mount on the real kernel: bind mounts, unmounting, mountinfo parsing, overlay by
classic mount(2) and by the new mount API (fsopen/fsconfig) for chains past one page."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.host import mount as mnt
from csi.errors import InvalidArgument, NotFound


@pytest.fixture
def area(ext4_dir: Path) -> Iterator[Path]:
    """A directory whose mounts are all removed afterwards, even when a test fails."""
    yield ext4_dir
    for mp in mnt.mounts_under(ext4_dir):
        mnt.unmount(mp.target, detach=True)


def test_flags_and_data_split() -> None:
    m = mnt.Mount("overlay", "overlay", ("ro", "nodev", "rw", "lowerdir=a:b", "index=off", "bind"))
    flags, data = m.flags_and_data()
    assert flags == mnt.MS_RDONLY | mnt.MS_NODEV | mnt.MS_BIND
    assert data == "lowerdir=a:b,index=off"


def test_bind_read_only_and_unmount(area: Path) -> None:
    src, dst = area / "src", area / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("content")
    mnt.bind(src, dst, readonly=True)
    try:
        point = mnt.find_mount(dst)
        assert point is not None and point.readonly and mnt.is_mount_point(dst)
        assert (dst / "f").read_text() == "content"
        with pytest.raises(OSError) as info:
            (dst / "g").write_text("x")
        assert info.value.errno == errno.EROFS
        (src / "g").write_text("through the source")  # the source stays writable
        assert (dst / "g").read_text() == "through the source"
    finally:
        mnt.unmount(dst)
    assert not mnt.is_mount_point(dst)
    assert not (dst / "f").exists()


def test_bind_writable_then_remount_readonly(area: Path) -> None:
    src, dst = area / "src", area / "dst"
    src.mkdir()
    dst.mkdir()
    mnt.bind(src, dst)
    try:
        (dst / "w").write_text("writable")
        mnt.remount_readonly(dst)
        with pytest.raises(OSError) as info:
            (dst / "x").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        mnt.unmount_all(dst)


def test_unmount_missing_ok(area: Path) -> None:
    plain = area / "plain"
    plain.mkdir()
    mnt.unmount(plain)  # not a mount point: fine
    mnt.unmount(area / "absent")  # does not exist: fine
    with pytest.raises(mnt.MountError) as info:
        mnt.unmount(plain, missing_ok=False)
    assert info.value.errno == errno.EINVAL


def test_unmount_all_removes_stacked_mounts(area: Path) -> None:
    a, b, target = area / "a", area / "b", area / "t"
    for d in (a, b, target):
        d.mkdir()
    (b / "top").write_text("b")
    mnt.bind(a, target)
    mnt.bind(b, target)
    assert (target / "top").exists()
    mnt.unmount_all(target)
    assert not mnt.is_mount_point(target)


def test_mount_errors_are_typed(area: Path) -> None:
    with pytest.raises(NotFound):
        mnt.bind(area / "missing", area)
    (area / "t").mkdir()
    with pytest.raises(mnt.MountError) as info:
        mnt.mount(mnt.Mount("no-such-fs-type", "none"), area / "t")
    assert info.value.errno == errno.ENODEV and "No such device" in str(info.value)


def test_mountinfo_parsing_unescapes_spaces(area: Path) -> None:
    src, dst = area / "with space\tand tab", area / "target dir"
    src.mkdir()
    dst.mkdir()
    mnt.bind(src, dst, readonly=True)
    try:
        point = mnt.find_mount(dst)
        assert point is not None
        assert point.target == str(dst) and point.readonly
        assert point.root.endswith("/with space\tand tab")
        assert point.fstype == "ext4" and point.mount_id > 0 and point.parent_id > 0
        assert [p.target for p in mnt.mounts_under(area)] == [str(dst)]
    finally:
        mnt.unmount(dst)


def test_mounts_under_lists_deepest_first(area: Path) -> None:
    outer, inner, src = area / "outer", area / "outer" / "inner", area / "src"
    src.mkdir()
    outer.mkdir()
    mnt.bind(src, outer)
    inner.mkdir()
    mnt.bind(src, inner)
    targets = [p.target for p in mnt.mounts_under(area)]
    assert targets == [str(inner), str(outer)]
    for target in targets:
        mnt.unmount(target)


def _lowers(root: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        lower = root / "l" / f"{i:03d}"
        lower.mkdir(parents=True)
        (lower / f"from-{i:03d}").write_text(str(i))
        (lower / "shadowed").write_text(str(i))
        names.append(f"l/{i:03d}")
    return names


def _overlay(root: Path, lowers: list[str], *, relative: bool) -> mnt.Mount:
    for d in ("upper", "work", "merged"):
        (root / d).mkdir()
    paths = lowers if relative else [str(root / l) for l in lowers]
    up, work = ("upper", "work") if relative else (str(root / "upper"), str(root / "work"))
    return mnt.Mount("overlay", "overlay", (f"lowerdir={':'.join(paths)}", f"upperdir={up}", f"workdir={work}"),
                     cwd=str(root) if relative else None)


def test_overlay_classic_mount_with_relative_lowers(area: Path) -> None:
    lowers = _lowers(area, 300)
    m = _overlay(area, lowers, relative=True)
    assert len(m.flags_and_data()[1]) < os.sysconf("SC_PAGE_SIZE")
    cwd = os.getcwd()
    mnt.mount(m, area / "merged")
    try:
        assert os.getcwd() == cwd  # the chdir for relative paths is undone
        assert mnt.find_mount(area / "merged").fstype == "overlay"  # type: ignore[union-attr]
        assert (area / "merged" / "shadowed").read_text() == "0"  # the first lower is on top
        assert len([n for n in os.listdir(area / "merged") if n.startswith("from-")]) == 300
        (area / "merged" / "new").write_text("up")
        assert (area / "upper" / "new").read_text() == "up"
    finally:
        mnt.unmount(area / "merged")


def test_overlay_fsconfig_path_for_long_chains(area: Path) -> None:
    lowers = _lowers(area, 260)
    m = _overlay(area, lowers, relative=False)
    assert len(m.flags_and_data()[1]) >= os.sysconf("SC_PAGE_SIZE"), "must not fit the classic call"
    mnt.mount(m, area / "merged")
    try:
        names = os.listdir(area / "merged")
        assert len([n for n in names if n.startswith("from-")]) == 260
        assert (area / "merged" / "shadowed").read_text() == "0"
        (area / "merged" / "new").write_text("up")
        assert (area / "upper" / "new").read_text() == "up"
    finally:
        mnt.unmount(area / "merged")


def test_overlay_fsconfig_reports_bad_lower(area: Path) -> None:
    lowers = _lowers(area, 250) + ["l/missing"]
    m = _overlay(area, lowers, relative=False)
    with pytest.raises(NotFound):
        mnt.mount(m, area / "merged")
    assert not mnt.is_mount_point(area / "merged")


def test_check_data_fits() -> None:
    mnt.check_data_fits(mnt.Mount("overlay", "overlay", ("lowerdir=" + "x" * 5000,)))
    with pytest.raises(InvalidArgument):
        mnt.check_data_fits(mnt.Mount("ext4", "/dev/x", ("opt=" + "x" * 5000,)))
