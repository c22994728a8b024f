"""The contract's recovery and inspection calls, as part of the shared driver conformance
suite (:class:`RecoveryChecks` is a base of :class:`conformance.DriverConformance`).

What the CSI services rely on after a restart, checked on every driver on the real kernel:
``references``/``set_references`` bring a layer's mounts in line with what the CSI records
say is held, ``release`` drops them all and removes the layer, ``read_layers`` shows every
record (hidden ones included) without opening the driver, and ``reconcile(dry_run=True)``
reports what a start-up sweep would do while changing nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi.errors import Busy
from csi.graphdriver.driver import LayerState
from csi.graphdriver.layered import LayerDriver
from csi.host import mount as mnt


def _tracks_mounts(drv: LayerDriver) -> bool:
    return type(drv)._is_active is not LayerDriver._is_active


class RecoveryChecks:
    def test_set_references_activates_and_releases(self, driver: LayerDriver) -> None:
        driver.create("w", None)
        with open(Path(driver.get("w")) / "data", "w") as f:
            f.write("kept")
        driver.put("w")
        driver.freeze("w", "f")
        assert driver.references("f") == 0
        driver.set_references("f", 2)
        assert driver.references("f") == 2
        path = driver.get("f")  # a third reference, same view
        assert (Path(path) / "data").read_text() == "kept"
        driver.put("f")
        driver.set_references("f", 0)
        assert driver.references("f") == 0
        assert not mnt.mounts_under(driver.home), "set_references(0) left a mount behind"
        driver.remove("f")  # not busy any more
        assert not driver.exists("f")

    def test_release_drops_references_and_removes(self, driver: LayerDriver) -> None:
        driver.create("w", None)
        driver.get("w")
        driver.get("w")
        driver.release("w")
        assert not driver.exists("w")
        assert driver.references("w") == 0
        assert not mnt.mounts_under(driver.home)
        driver.release("w")  # a layer that is gone: nothing happens

    def test_read_layers_shows_hidden_records(self, driver: LayerDriver) -> None:
        driver.create("w", None)
        driver.freeze("w", "f")
        driver.create("c", "f")
        driver.remove("f")  # has a child: hidden
        records = {l.id: l for l in type(driver).read_layers(driver.home)}
        assert set(records) >= {"w", "f", "c"}
        assert records["f"].hidden and records["f"].state is LayerState.READY
        assert records["c"].parent == "f"
        assert "f" not in {l.id for l in driver.layers()}
        assert type(driver).holds_state(driver.home)
        assert [l.id for l in driver.chain("c")] == ["c", "f"]

    def test_reconcile_dry_run_reports_and_changes_nothing(self, driver: LayerDriver) -> None:
        driver.create("w", None)
        driver.freeze("w", "f")
        assert driver.reconcile(dry_run=True).clean
        driver.get("f")
        if not _tracks_mounts(driver):
            driver.put("f")
            return
        # a reboot loses every mount while the reference count persists
        for mp in sorted(mnt.mounts_under(driver.home), key=lambda m: len(m.target), reverse=True):
            mnt.unmount(mp.target, detach=True)
        before = sorted(os.listdir(driver.home))
        report = driver.reconcile(dry_run=True)
        assert report.dry_run and report.remounted == ("f",)
        assert not mnt.mounts_under(driver.home), "a dry run mounted something"
        assert sorted(os.listdir(driver.home)) == before
        done = driver.reconcile()
        assert done.remounted == ("f",) and not done.dry_run
        assert driver.references("f") == 1
        driver.put("f")

    def test_a_view_is_never_recorded(self, driver: LayerDriver) -> None:
        """A diff stream reads through ``view``: in use meanwhile (``remove`` is Busy), yet a
        process killed while it reads leaves no reference in the records."""
        driver.create("w", None)
        with open(Path(driver.get("w")) / "data", "w") as f:
            f.write("kept")
        driver.put("w")
        driver.freeze("w", "f")
        with driver.view("f") as path:
            assert (path / "data").read_text() == "kept"
            assert driver.references("f") == 0
            with pytest.raises(Busy):
                driver.remove("f")
            driver.get("f")  # a recorded reference meanwhile, released before the view ends
            driver.put("f")
            assert (path / "data").read_text() == "kept"
        assert not [m for m in mnt.mounts_under(driver.home) if "/f" in m.target], "the view left a mount"
        driver.remove("f")

    def test_clone_holds_the_source_content_and_leaves_it_writable(self, driver: LayerDriver) -> None:
        driver.create("src", None)
        src = Path(driver.get("src"))
        (src / "a").write_text("one")
        clone = driver.clone("src", "c", "base")
        (src / "a").write_text("changed after the clone")
        driver.put("src")
        assert (Path(driver.get("c")) / "a").read_text() == "one"
        (Path(driver.get("c")) / "b").write_text("the clone is writable")
        driver.put("c")
        driver.put("c")
        assert not driver.layer("c").frozen
        if type(driver).clone_copies:  # one copy of the source, no frozen base (vfs)
            assert clone.parent is None
        else:  # a frozen base, hidden at once, freed with the clone
            assert clone.parent == "base" and not driver.exists("base")
        driver.remove("c")
        assert not driver.exists("c")
        assert {l.id for l in type(driver).read_layers(driver.home)} == {"src"}
