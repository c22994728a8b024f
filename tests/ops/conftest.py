"""Fixtures of the operator tests: real stores made by the real plugin on each driver, and
the real ``strata`` command run as a subprocess."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
import sys

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from csi_harness import Harness  # noqa: E402


@pytest.fixture
def harness_on(request: pytest.FixtureRequest, ext4_dir: Path) -> Iterator[Callable[[str], Harness]]:
    """A plugin on ``driver`` whose socket is the default one, ``<root>/csi.sock`` (what the
    operator commands look for); torn down after the test."""
    made: list[Harness] = []

    def start(driver: str) -> Harness:
        base = request.getfixturevalue("btrfs_dir") if driver == "btrfs" else ext4_dir
        harness = Harness(Path(base) / f"ops-{driver}", driver)
        harness.config = replace(harness.config, endpoint="")
        made.append(harness)
        return harness.start()

    yield start
    for harness in made:
        harness.teardown()
