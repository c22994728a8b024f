"""Helpers of the operator tests, under a unique module name (tests import them from here,
never from ``conftest``): the drivers they run on, and the real ``strata`` command run as a
subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


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
