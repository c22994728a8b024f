"""Fixtures of the operator tests: real stores made by the real plugin on each driver, and
the real ``strata`` command run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from csi_harness import Harness  # noqa: E402

DRIVERS = ("vfs", "overlay", "btrfs")
REPO = Path(__file__).resolve().parents[2]


def strata(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``strata`` command (the installed console script's module) as a child."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("STRATA_DRIVER", None)
    return subprocess.run([sys.executable, "-m", "csi.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def strata_json(*args: str) -> tuple[int, Any]:
    done = strata(*args, "--json")
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


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
