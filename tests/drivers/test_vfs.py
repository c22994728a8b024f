"""The vfs driver: the conformance suite on ext4 and on btrfs, plus what is vfs's own
(reflinks on btrfs, the copy's fidelity, the on-disk layout)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conformance import DriverConformance, open_driver, populate, tree_state
from csi.graphdriver.vfs import VfsDriver


class TestVfsOnExt4(DriverConformance):
    @pytest.fixture
    def driver(self, ext4_dir: Path) -> Iterator[VfsDriver]:
        with open_driver(VfsDriver, ext4_dir / "vfs") as drv:
            yield drv  # type: ignore[misc]


class TestVfsOnBtrfs(DriverConformance):
    @pytest.fixture
    def driver(self, btrfs_dir: Path) -> Iterator[VfsDriver]:
        with open_driver(VfsDriver, btrfs_dir / "vfs") as drv:
            yield drv  # type: ignore[misc]
