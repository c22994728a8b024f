"""The shared driver conformance suite (tests/conformance.py) on vfs and overlay homes on
XFS mounted with ``prjquota``, where sizes are enforced by project quota (its size check
runs there instead of skipping). Runs inside the qemu guest only.

``max_depth`` is 16: deep chains are covered on the host (128 for vfs, 500 for overlay)
and add nothing quota-specific under software emulation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from conformance import DriverConformance, open_driver

from csi.graphdriver.overlay import OverlayDriver
from csi.graphdriver.vfs import VfsDriver


class TestVfsOnXfsQuota(DriverConformance):
    max_depth: ClassVar[int] = 16

    @pytest.fixture
    def driver(self, xfs_prjquota: Path) -> Iterator[VfsDriver]:
        with open_driver(VfsDriver, xfs_prjquota / "vfs") as drv:
            assert drv.size_enforcement().startswith("xfs project quota")
            yield drv


class TestOverlayOnXfsQuota(DriverConformance):
    max_depth: ClassVar[int] = 16

    @pytest.fixture
    def driver(self, xfs_prjquota: Path) -> Iterator[OverlayDriver]:
        with open_driver(OverlayDriver, xfs_prjquota / "overlay") as drv:
            assert drv.size_enforcement().startswith("xfs project quota")
            yield drv
