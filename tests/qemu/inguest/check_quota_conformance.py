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

from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.graphdriver.vfs import VfsDriver


class _OnXfsQuota(DriverConformance):
    """The suite for ``driver_class`` on an XFS home with prjquota (collected through subclasses)."""

    max_depth: ClassVar[int] = 16
    driver_class: ClassVar[type[LayerDriver]]

    @pytest.fixture
    def driver(self, xfs_prjquota: Path) -> Iterator[LayerDriver]:
        with open_driver(self.driver_class, xfs_prjquota / self.driver_class.name) as drv:
            assert drv.size_enforcement().startswith("xfs project quota")
            yield drv


class TestVfsOnXfsQuota(_OnXfsQuota):
    driver_class = VfsDriver


class TestOverlayOnXfsQuota(_OnXfsQuota):
    driver_class = OverlayDriver
