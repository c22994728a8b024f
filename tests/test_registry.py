"""Per-node driver selection (csi.graphdriver.registry.new_driver) with the real drivers.

The real driver classes are used everywhere; a few small subclasses exist only to make
an init fail in a specific way that this machine cannot produce on its own (say, overlay
reporting missing prerequisites): each one's docstring says which error it stands for.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from csi.host import mount as mnt
from csi.errors import (IncompatibleFilesystem, InvalidArgument, NotSupported, PrerequisitesMissing,
                        StrataError)
from csi.graphdriver import registry
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.btrfs.driver import BtrfsDriver
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.errors import NoDriverAvailable
from csi.graphdriver.registry import Selection, driver_class, holds_state, new_driver
from csi.graphdriver.vfs import VfsDriver


class OverlayWithoutPrerequisites(OverlayDriver):
    """Stands for an overlay driver whose prerequisites (e.g. a tool) are missing."""

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        raise PrerequisitesMissing("overlay: stand-in for a missing prerequisite")


class OverlayThatBreaks(OverlayDriver):
    """Stands for an overlay driver whose init fails for a reason that is not 'skip me'."""

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        raise StrataError("overlay: the home is corrupt")


def factory_with(**replacements: type[LayerDriver]):  # type: ignore[no-untyped-def]
    def factory(name: str) -> type[LayerDriver]:
        return replacements.get(name) or driver_class(name)

    return factory


@pytest.fixture
def root(ext4_dir: Path) -> Iterator[Path]:
    yield ext4_dir
    for mp in mnt.mounts_under(ext4_dir):
        mnt.unmount(mp.target, detach=True)


def close(selection: Selection) -> LayerDriver:
    selection.driver.store.close()
    return selection.driver


def test_explicit_name_wins(root: Path) -> None:
    sel = new_driver(root, "vfs")
    assert isinstance(close(sel), VfsDriver) and sel.reason == "explicit"
    assert sel.driver.home == root / "vfs"


def test_environment_names_the_driver(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_DRIVER, "vfs")
    sel = new_driver(root)
    assert isinstance(sel.driver, VfsDriver) and sel.reason == "explicit"
    sel.driver.create("kept")
    close(sel)
    monkeypatch.setenv(registry.ENV_DRIVER, "auto")
    sel = new_driver(root)
    assert close(sel).name == "vfs" and sel.reason == "prior state"


def test_explicit_driver_that_cannot_run_is_an_error(root: Path) -> None:
    with pytest.raises(IncompatibleFilesystem, match="not btrfs"):
        new_driver(root, "btrfs")
    with pytest.raises(InvalidArgument, match="unknown driver 'zfs'"):
        new_driver(root, "zfs")


def test_priority_on_ext4_skips_btrfs_and_picks_overlay(root: Path) -> None:
    sel = new_driver(root)
    assert isinstance(close(sel), OverlayDriver) and sel.reason == "priority"
    assert [name for name, _ in sel.skipped] == ["btrfs"]
    assert "not btrfs" in sel.skipped[0][1]


def test_priority_on_btrfs_picks_btrfs(btrfs_dir: Path) -> None:
    sel = new_driver(btrfs_dir)
    assert isinstance(close(sel), BtrfsDriver) and sel.skipped == ()


def test_skips_unavailable_drivers_down_to_vfs(root: Path) -> None:
    sel = new_driver(root, factory=factory_with(overlay=OverlayWithoutPrerequisites))
    assert isinstance(close(sel), VfsDriver)
    skipped = dict(sel.skipped)
    assert list(skipped) == ["btrfs", "overlay", "aufs", "devicemapper"]
    assert "stand-in for a missing prerequisite" in skipped["overlay"]
    assert "aufs" in skipped["aufs"]  # this kernel has no aufs
    assert not (root / "overlay").exists() or not any((root / "overlay").iterdir())


def test_other_init_error_stops_start_up(root: Path) -> None:
    with pytest.raises(StrataError, match="the home is corrupt"):
        new_driver(root, factory=factory_with(overlay=OverlayThatBreaks))
    assert not (root / "vfs").exists(), "start-up must stop, not fall through to vfs"


def test_nothing_fits_lists_every_reason(root: Path) -> None:
    class NothingHere(VfsDriver):
        """Stands for a vfs that cannot run (the real one runs everywhere)."""

        @classmethod
        def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
            raise NotSupported("vfs: stand-in, cannot run")

    with pytest.raises(NoDriverAvailable) as info:
        new_driver(root, factory=factory_with(overlay=OverlayWithoutPrerequisites, vfs=NothingHere))
    message = str(info.value)
    for name in registry.PRIORITY:
        assert f"{name}:" in message
    assert "stand-in, cannot run" in message and "not btrfs" in message


def test_prior_state_is_reused_over_priority(root: Path) -> None:
    vfs = VfsDriver(root / "vfs")
    vfs.create("kept")
    vfs.store.close()
    sel = new_driver(root)
    assert isinstance(sel.driver, VfsDriver) and sel.reason == "prior state"
    assert sel.driver.exists("kept")
    close(sel)


def test_two_drivers_with_state_are_refused(root: Path) -> None:
    for cls in (VfsDriver, OverlayDriver):
        drv = cls(root / cls.name)
        drv.create("x")
        drv.store.close()
    with pytest.raises(InvalidArgument) as info:
        new_driver(root)
    assert "overlay" in str(info.value) and "vfs" in str(info.value)
    sel = new_driver(root, "vfs")  # an explicit choice still works
    assert sel.driver.exists("x")
    close(sel)


def test_holds_state(root: Path) -> None:
    assert not holds_state(root, "vfs")
    drv = VfsDriver(root / "vfs")  # a home with an empty record table holds no state
    drv.store.close()
    assert not holds_state(root, "vfs")
    (root / "overlay").mkdir()
    (root / "overlay" / "stray").write_text("x")
    assert holds_state(root, "overlay")  # no records but not empty
    (root / "btrfs").mkdir()
    (root / "btrfs" / "layers.db").write_bytes(b"not a database at all" * 100)
    assert holds_state(root, "btrfs")  # unreadable records: assume state, never overwrite
    with sqlite3.connect(root / "vfs" / "layers.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM layers").fetchone()[0] == 0


def test_missing_driver_module_is_a_prerequisite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.DRIVER_CLASSES, "vfs", "csi.graphdriver.not_there:Nope")  # type: ignore[arg-type]
    with pytest.raises(PrerequisitesMissing, match="driver module unavailable"):
        driver_class("vfs")
