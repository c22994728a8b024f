"""Fixtures for the CSI tests: a plugin server per test on each layered driver.

``plugin_on(driver)`` starts a server over a fresh directory of the filesystem the
driver needs (ext4 for vfs and overlay, the btrfs loop filesystem for btrfs) and tears
it down, unmounting everything under it, after the test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from csi_harness import Harness

DRIVERS = ("vfs", "overlay", "btrfs")


def driver_module_present(name: str) -> bool:
    return importlib.util.find_spec(f"csi.graphdriver.{name}") is not None


@pytest.fixture
def plugin_on(request: pytest.FixtureRequest, ext4_dir: Path) -> Iterator[Callable[[str], Harness]]:
    made: list[Harness] = []

    def start(driver: str) -> Harness:
        if not driver_module_present(driver):
            pytest.skip(f"driver module csi.graphdriver.{driver} does not exist yet")
        base = request.getfixturevalue("btrfs_dir") if driver == "btrfs" else ext4_dir
        harness = Harness(Path(base) / f"csi-{driver}", driver)
        made.append(harness)
        return harness.start()

    yield start
    for harness in made:
        harness.teardown()


@pytest.fixture
def vfs_plugin(plugin_on: Callable[[str], Harness]) -> Harness:
    return plugin_on("vfs")
