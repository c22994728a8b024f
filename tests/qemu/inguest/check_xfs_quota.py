"""XFS project quota (csi.graphdriver.quota.xfs) on a real XFS mounted with prjquota.

Runs inside the qemu guest only (this host kernel has no filesystem quotas)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from quota_writes import MIB, fill, wait_uncharged

from csi.host import mount as mnt
from csi.errors import InvalidArgument
from csi.graphdriver.quota import xfs as xq
from csi.graphdriver.quota.xfs import ProjectQuota


def test_for_home_is_none_without_prjquota(guest_scratch: Path) -> None:
    assert ProjectQuota.for_home(guest_scratch) is None  # ext4 scratch disk, no quota


def test_write_past_limit_fails_with_enospc(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    layer = quota.home / "layer1"
    layer.mkdir()
    pid = quota.assign(layer, 8 * MIB)
    assert xq.get_project(layer) == pid >= xq.DEFAULT_FIRST_ID
    written = fill(layer / "big", 32 * MIB)
    assert 6 * MIB <= written <= 8 * MIB
    usage = quota.usage(layer)
    assert usage is not None and usage.limit_bytes == 8 * MIB and usage.used_bytes >= 6 * MIB
    # a sibling without a project is not limited by it
    free = quota.home / "free"
    free.mkdir()
    assert fill(free / "f", 16 * MIB) == 16 * MIB


def test_limit_holds_through_an_overlay_upper_dir(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    layer = quota.home / "ovl"
    for sub in ("lower", "upper", "work", "merged"):
        (layer / sub).mkdir(parents=True)
    quota.assign(layer, 8 * MIB)
    merged = layer / "merged"
    mnt.mount(mnt.Mount("overlay", "overlay", (f"lowerdir={layer/'lower'}", f"upperdir={layer/'upper'}",
                                                 f"workdir={layer/'work'}")), merged)
    try:
        written = fill(merged / "big", 32 * MIB)
    finally:
        mnt.unmount(merged)
    assert 6 * MIB <= written <= 8 * MIB


def test_resize_raises_the_limit(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    layer = quota.home / "grow"
    layer.mkdir()
    pid = quota.assign(layer, 4 * MIB)
    assert fill(layer / "a", 16 * MIB) <= 4 * MIB
    assert quota.resize(layer, 12 * MIB) == pid
    assert 6 * MIB <= fill(layer / "b", 16 * MIB) <= 8 * MIB + MIB


def test_existing_content_is_charged(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    layer = quota.home / "pre"
    (layer / "sub").mkdir(parents=True)
    (layer / "sub" / "old").write_bytes(b"y" * (3 * MIB))
    quota.assign(layer, 64 * MIB)
    os.sync()
    usage = quota.usage(layer)
    assert usage is not None and usage.used_bytes >= 3 * MIB
    (layer / "sub" / "new").write_bytes(b"z")
    assert xq.get_project(layer / "sub" / "new") == usage.project_id


def test_release_frees_id_and_clears_limit(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    a, b = quota.home / "a", quota.home / "b"
    a.mkdir()
    b.mkdir()
    pid_a = quota.assign(a, 4 * MIB)
    quota.release(a)
    quota.release(a)  # idempotent
    assert xq.read_usage(quota.home, pid_a).limit_bytes == 0
    assert fill(a / "f", 8 * MIB) == 8 * MIB  # no limit any more
    # a still carries the ID and its files are charged to it: not handed out again ...
    pid_b = quota.assign(b, 4 * MIB)
    assert pid_b != pid_a
    assert quota.assigned() == {"b": pid_b}
    # ... until nothing is charged to it (deleted inodes are reclaimed in the background)
    shutil.rmtree(a)
    wait_uncharged(quota.home, pid_a)
    c = quota.home / "c"
    c.mkdir()
    assert quota.assign(c, 4 * MIB) == pid_a  # the ID is free again
    assert quota.assigned() == {"b": pid_b, "c": pid_a}


def test_crash_leftovers_are_reconciled(xfs_prjquota: Path) -> None:
    """A record whose directory is gone (crash between rmdir and release) is dropped,
    its limit cleared, when the home is opened again."""
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    gone = quota.home / "gone"
    gone.mkdir()
    pid = quota.assign(gone, 4 * MIB)
    os.rmdir(gone)  # the driver removed the layer, then "crashed"
    reopened = ProjectQuota.for_home(quota.home)
    assert reopened is not None and reopened.assigned() == {}
    assert xq.read_usage(quota.home, pid).limit_bytes == 0


def test_bad_input_changes_nothing(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    inside = quota.home / "x"
    inside.mkdir()
    with pytest.raises(InvalidArgument):
        quota.assign(xfs_prjquota, MIB)  # outside the home
    with pytest.raises(InvalidArgument):
        quota.assign(quota.home / ".." / "..", MIB)
    with pytest.raises(InvalidArgument):
        quota.assign(inside, 0)
    with pytest.raises(InvalidArgument):
        quota.assign(quota.home / "missing", MIB)
    assert quota.assigned() == {}


def test_adopt_follows_a_renamed_directory(xfs_prjquota: Path) -> None:
    """overlay's O(1) freeze renames a tagged upper dir: its ID follows it, without limit."""
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    old = quota.home / "old"
    old.mkdir()
    (old / "f").write_bytes(b"a" * MIB)
    pid = quota.assign(old, 8 * MIB)
    (quota.home / "frozen").mkdir()
    os.rename(old, quota.home / "frozen" / "diff")
    assert quota.adopt(quota.home / "frozen" / "diff") == pid
    assert quota.adopt(quota.home / "frozen" / "diff") == pid  # idempotent
    assert quota.assigned() == {"frozen/diff": pid}
    assert xq.read_usage(quota.home, pid).limit_bytes == 0
    plain = quota.home / "plain"
    plain.mkdir()
    assert quota.adopt(plain) is None and quota.assigned() == {"frozen/diff": pid}


def test_ensure_restores_a_lost_limit(xfs_prjquota: Path) -> None:
    quota = ProjectQuota.for_home(xfs_prjquota / "home")
    assert quota is not None
    layer = quota.home / "layer"
    layer.mkdir()
    pid = quota.assign(layer, 4 * MIB)
    assert quota.ensure(layer, 4 * MIB) == pid
    xq.set_limit(quota.home, pid, 0)
    assert quota.ensure(layer, 4 * MIB) == pid
    assert xq.read_usage(quota.home, pid).limit_bytes == 4 * MIB
    assert fill(layer / "f", 16 * MIB) <= 4 * MIB
