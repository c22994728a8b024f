"""The kernel lane: checks that need device-mapper and XFS project quota, which this
host's kernel lacks, run inside a stock Debian kernel under qemu (TCG).

One guest boots per test session (module-scoped fixture) and runs every
``tests/qemu/inguest/check_*.py`` with pytest, writing JUnit XML to the exchange
directory. The check IDs are collected on the host (``--collect-only``, cheap: nothing
runs) so that each guest check becomes its own host test here, passing, failing (with
the guest's message) or skipping (with the guest's reason) as it did in the guest.

Skips only when qemu cannot run at all (no ``qemu-system-x86_64``). Set
``STRATA_QEMU_LANE=0`` to leave the lane out of a local run explicitly (it says so), or
``STRATA_QEMU_CHECKS="tests/qemu/inguest/check_x.py ..."`` to boot the guest for those
checks only while working on them (CI always runs them all).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from .guest import GuestRun, HostPathError, hidden_host_paths, qemu_unavailable, run_in_guest

REPO = Path(__file__).resolve().parents[2]
INGUEST = Path(__file__).with_name("inguest")
GUEST_TIMEOUT_S = int(os.environ.get("STRATA_QEMU_TIMEOUT", "1200"))  # a hang guard, not the budget

# the module's first test boots the guest in its setup: allow it the guest's whole run
pytestmark = pytest.mark.timeout(GUEST_TIMEOUT_S + 180)
PYTEST_ARGS = ["-p", "no:cacheprovider", "-o", "python_files=check_*.py", "-o", "addopts=-ra"]


def selected_checks() -> list[str]:
    """What the guest runs: STRATA_QEMU_CHECKS (paths or node IDs) or the whole in-guest folder."""
    chosen = os.environ.get("STRATA_QEMU_CHECKS", "").split()
    return chosen or [str(INGUEST.relative_to(REPO))]


def guest_check_ids() -> list[str]:
    """Node IDs of the in-guest checks (relative to the repository), collected on the host."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *PYTEST_ARGS, *selected_checks()],
        cwd=REPO, capture_output=True, text=True,
    )
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if not ids:
        raise RuntimeError(f"collecting the in-guest checks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return ids


@dataclass(frozen=True)
class GuestOutcome:
    outcome: str  # passed, failed, skipped
    message: str


@dataclass(frozen=True)
class LaneResult:
    run: GuestRun
    outcomes: dict[str, GuestOutcome]


def parse_junit(path: Path) -> dict[str, GuestOutcome]:
    """JUnit XML (pytest's) -> node ID -> outcome."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        name = case.get("name", "")
        # classname is "tests.qemu.inguest.check_x" (or "...check_x.Class"); rebuild the node ID
        parts = module.split("/")
        for cut in range(len(parts), 0, -1):
            candidate = REPO / ("/".join(parts[:cut]) + ".py")
            if candidate.exists():
                nodeid = "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])
                break
        else:
            nodeid = f"{module}::{name}"
        outcome, message = "passed", ""
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                outcome, message = "failed", (el.get("message", "") + "\n" + (el.text or ""))
        skipped = case.find("skipped")
        if skipped is not None and outcome == "passed":
            outcome, message = "skipped", skipped.get("message", "")
        outcomes[nodeid] = GuestOutcome(outcome, message)
    return outcomes


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> LaneResult:
    why = qemu_unavailable()
    if why:
        pytest.skip(f"qemu cannot run here: {why}")
    if os.environ.get("STRATA_QEMU_LANE") == "0":
        pytest.skip("kernel lane switched off by STRATA_QEMU_LANE=0")
    try:
        hidden_host_paths()
    except HostPathError as exc:
        pytest.skip(f"the guest cannot see this checkout: {exc}")
    exchange = tmp_path_factory.mktemp("guest")
    # basetemp on the scratch disk (ext4): the guest's /tmp is a tmpfs without user xattrs
    args = " ".join(shlex.quote(a) for a in [*PYTEST_ARGS, "--timeout=300", "--junitxml=/tmp/xchg/junit.xml",
                                             "--basetemp=/var/tmp/pytest",
                                             *selected_checks()])
    script = f"cd {shlex.quote(str(REPO))}\nexec {shlex.quote(sys.executable)} -m pytest {args}\n"
    run = run_in_guest(script, exchange=exchange, timeout_s=GUEST_TIMEOUT_S)
    junit = exchange / "junit.xml"
    if not junit.exists():
        pytest.fail(f"guest pytest wrote no report (exit {run.exit_status}):\n{run.output[-4000:]}\n{run.console[-2000:]}")
    return LaneResult(run, parse_junit(junit))


@pytest.mark.parametrize("check", guest_check_ids())
def test_in_guest(lane: LaneResult, check: str) -> None:
    result = lane.outcomes.get(check)
    if result is None:
        pytest.fail(f"the guest did not report {check} (exit {lane.run.exit_status}):\n{lane.run.output[-3000:]}")
    if result.outcome == "skipped":
        pytest.skip(f"skipped in the guest: {result.message}")
    if result.outcome == "failed":
        pytest.fail(f"failed in the guest:\n{result.message}", pytrace=False)


def test_guest_run_finished(lane: LaneResult, record_property: pytest.RecordProperty) -> None:
    """The guest's pytest ended normally (0 = all passed, 1 = some failed: reported above)."""
    record_property("guest_seconds", round(lane.run.seconds, 1))
    print(f"guest lane: {len(lane.outcomes)} checks in {lane.run.seconds:.0f}s")
    assert lane.run.exit_status in (0, 1), lane.run.output[-3000:]
