"""The shared driver conformance suite (tests/conformance.py) on devicemapper, on a
loop-lvm thin pool, ext4 on each thin device. Runs inside the qemu guest only.

``max_depth`` is 16: every level is a thin snapshot plus an activation under software
emulation, and the 128-level chain would take most of the lane's time budget for no
new coverage (thin snapshots do not nest: each is one metadata entry in the pool)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from conformance import DriverConformance, open_driver

from csi.graphdriver.devicemapper.driver import DevmapperDriver

OPTIONS = {"dm.loopback": "true", "dm.loopdatasize": "4G", "dm.loopmetadatasize": "64M", "dm.basesize": "64M"}


class TestDevmapperConformance(DriverConformance):
    max_depth: ClassVar[int] = 16

    @pytest.fixture
    def driver(self, dm_home: Path) -> Iterator[DevmapperDriver]:
        with open_driver(DevmapperDriver, dm_home, OPTIONS) as drv:  # dm_home releases the pool after
            yield drv  # type: ignore[misc]
