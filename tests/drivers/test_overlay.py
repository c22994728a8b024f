"""The overlay driver on the real kernel: the shared conformance suite on ext4 and on
btrfs (loop file), plus overlay's own checks (whiteout conversion, O(1) freeze, 500-deep
chains, kill -9 during freeze)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conformance import DriverConformance, open_driver  # noqa: E402

from csi.graphdriver.overlay import OverlayDriver  # noqa: E402


class TestOverlayOnExt4(DriverConformance):
    max_depth = 500

    @pytest.fixture
    def driver(self, ext4_dir: Path) -> Iterator[OverlayDriver]:
        with open_driver(OverlayDriver, ext4_dir / "overlay") as drv:
            yield drv  # type: ignore[misc]


class TestOverlayOnBtrfs(DriverConformance):
    max_depth = 500

    @pytest.fixture
    def driver(self, btrfs_dir: Path) -> Iterator[OverlayDriver]:
        with open_driver(OverlayDriver, btrfs_dir / "overlay") as drv:
            yield drv  # type: ignore[misc]
