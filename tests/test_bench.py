"""Smoke tests of ``strata bench``: it runs end to end with tiny sizes on the real kernel
(real overlay mounts, a real btrfs loop filesystem it makes itself), prints every table
with numbers and ratios, computes each goal's verdict from its own figures, and leaves
no mount, loop device or scratch file behind — also when stopped by SIGTERM or given bad
flags. No timing is asserted: the figures are whatever this machine gives.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from csi.host import mount as mnt
from csi.bench.drivers import GOAL_GET_PUT_P50_S
from csi.bench.floor import measure as measure_floor
from csi.bench.fsenv import format_size
from csi.errors import InvalidArgument
from csi.host.fsinfo import parse_size
from csi.bench.lifecycle import LIFECYCLE_RPCS, plugin_available
from csi.bench.report import Latency, at_least, at_most, percentile, ratio

REPO = Path(__file__).resolve().parents[1]
TIME = r"\d+(\.\d+)? (ms|s)"
RATIO = r"\((x|/)\d+(\.\d+)?\)"


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi.cli", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _loops_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def _assert_nothing_left(scratch: Path) -> None:
    assert mnt.mounts_under(scratch) == []
    assert _loops_under(scratch) == []
    assert list(scratch.iterdir()) == []


@pytest.fixture
def bench_scratch(scratch_root: Path) -> Path:
    path = scratch_root / f"bench-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def test_quick_run_prints_tables_with_figures_and_computed_goals(bench_scratch: Path, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    run = _bench("--quick", "--scratch", str(bench_scratch), "--json", str(report))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for title in ("Freeze and clone of a layer vs a full copy of its data", "get / put latency",
                  "Mount of the deepest chain", "diff throughput vs tar -c", "Layered drivers: goals"):
        assert title in out
    for label in ("vfs on ext4", "vfs on btrfs", "overlay on ext4", "overlay on btrfs", "btrfs on btrfs"):
        freeze_rows = [line for line in out.splitlines() if line.startswith(label) and re.search(RATIO, line)]
        assert len(freeze_rows) >= 2, f"{label}: no freeze/clone rows with ratios in\n{out}"
        assert re.search(rf"{label}\s+\d+M\s+{TIME}\s+{TIME} {RATIO}", out), label
        assert re.search(rf"{label}\s+\d+ MB/s|{label}\s+\d+M\s+\d+ MB/s\s+\d+ MB/s\s+\d+%", out), label
    assert re.search(r"Goals: \d+ PASS, \d+ MISS, 0 n/a; failed cases: 0", out)

    document = json.loads(report.read_text())
    drivers = next(s for s in document["sections"] if s["name"] == "Layered drivers")
    assert {c["case"] for c in drivers["figures"]["cases"]} == {
        "vfs on ext4", "vfs on btrfs", "overlay on ext4", "overlay on btrfs", "btrfs on btrfs"}
    assert all(g["verdict"] in ("PASS", "MISS") for g in drivers["goals"])
    # Verdicts follow the figures of the same run (recomputed here from the raw numbers).
    goals = {g["subject"]: g["verdict"] for g in drivers["goals"]}
    for case in drivers["figures"]["cases"]:
        assert case["error"] is None
        p50 = case["get_put"]["get"]["p50"]
        expected = "PASS" if p50 <= GOAL_GET_PUT_P50_S else "MISS"
        assert goals[f"{case['case']}: get p50, 10-layer chain"] == expected
        for size in case["sizes"]:
            assert size["copy_s"] > 0 and size["freeze_unmounted_s"] > 0
    csi = next(s for s in document["sections"] if s["name"] == "CSI plugin")
    if plugin_available() is None:
        assert {c["case"] for c in csi["figures"]["cases"]} == {c["case"] for c in drivers["figures"]["cases"]}
        for case in csi["figures"]["cases"]:
            assert case["error"] is None
            assert [rpc for rpc, _ in case["latency"]] == list(LIFECYCLE_RPCS)
            assert case["creates_per_s"] > 0
            assert len(case["data"]) == 2
            floor = case["floor"]  # the bare server of the same run, on the case's filesystem
            assert floor["rpc"]["p50"] > 0 and floor["durable"]["p50"] > 0 and floor["calls_per_s"] > 0
        assert "Against the floor" in out
        assert re.search(rf"vfs on ext4\s+CreateVolume\s+{TIME}\s+{TIME}", out)
        assert all(g["verdict"] in ("PASS", "MISS") for g in csi["goals"])
    else:
        assert csi["figures"]["cases"] == [] and "CSI plugin" in out and plugin_available() in out
    _assert_nothing_left(bench_scratch)


def test_sigterm_tears_down_mounts_loop_device_and_scratch(bench_scratch: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "csi.cli", "bench", "--parts", "drivers", "--sizes", "64M",
                             "--scratch", str(bench_scratch)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(mp.fstype == "btrfs" for mp in mnt.mounts_under(bench_scratch)):
            assert proc.poll() is None and time.monotonic() < deadline, "bench never mounted its btrfs"
            time.sleep(0.05)
        time.sleep(0.5)  # let it get into the work
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    _assert_nothing_left(bench_scratch)


@pytest.mark.parametrize("flags, message", [
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "12Q"], "--sizes"),
    (["--drivers", "zfs"], "unknown zfs"),
    (["--parts", "everything"], "--parts"),
])
def test_bad_flags_are_refused_before_anything_is_made(bench_scratch: Path, flags: list[str], message: str) -> None:
    run = _bench(*flags, "--scratch", str(bench_scratch), timeout=60)
    assert run.returncode == 2
    assert message in run.stderr
    _assert_nothing_left(bench_scratch)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert Latency.of([0.004, 0.001, 0.009]) == Latency(3, 0.004, 0.009, 0.009)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_goal_verdicts_follow_the_numbers() -> None:
    assert at_most("x", 0.049, 0.050).verdict == "PASS"
    assert at_most("x", 0.051, 0.050).verdict == "MISS"
    assert at_most("x", None, 0.050).verdict == "n/a"
    assert at_least("x", 0.79, 0.80, lambda v: f"{v:.0%}").verdict == "MISS"
    assert at_least("x", 0.81, 0.80, lambda v: f"{v:.0%}").verdict == "PASS"
    assert ratio(1.0, 0.01) == "x100"
    assert ratio(1.0, 4.0) == "/4.0"


def test_sizes_parse_and_print() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("1GiB") == 1 << 30
    assert format_size(256 << 20) == "256M"
    for bad in ("0", "-1M", "M", "lots"):
        with pytest.raises(InvalidArgument):
            parse_size(bad)


def test_quick_scale_part_reports_curves_and_goals(bench_scratch: Path, tmp_path: Path) -> None:
    """``--parts scale`` on vfs: a real plugin filled to 200 volumes and 50 snapshots; every
    checkpoint has figures, the goals are computed from them, nothing is left behind."""
    report = tmp_path / "scale.json"
    run = _bench("--quick", "--parts", "scale", "--drivers", "vfs", "--scratch", str(bench_scratch),
                 "--json", str(report))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Scale: a node filling up to 200 volumes and 50 snapshots" in run.stdout
    scale = next(s for s in json.loads(report.read_text())["sections"] if s["name"] == "Scale")
    for case in scale["figures"]["cases"]:
        assert case["error"] is None
        points = case["checkpoints"]
        assert [p["volumes"] for p in points] == [0, 50, 100, 150, 200]
        assert points[-1]["snapshots"] == 50
        assert all(p["rss_bytes"] > 0 and p["page_max_s"] > 0 for p in points)
        assert case["restart_s"] > 0 and len(case["cycle_rss"]) >= 2
    subjects = {g["subject"]: g["verdict"] for g in scale["goals"]}
    assert any("restart to ready Probe" in s for s in subjects)
    assert all(v in ("PASS", "MISS") for v in subjects.values())
    _assert_nothing_left(bench_scratch)


def test_quick_backup_part_reports_baselines_and_goals(bench_scratch: Path, tmp_path: Path) -> None:
    """``--parts backup`` on every driver: a real docker-registry started and removed by the
    bench, export vs tar -c (and zstd), backup/restore vs skopeo copy, the incremental backup
    after a 1 MiB change moving about that much, and the restore next to the parent importing
    only the new layer; the goals are computed from the figures; nothing is left behind."""
    from csi.bench.backup import missing_tools

    if missing_tools():
        pytest.skip(f"backup part: {missing_tools()}")
    report = tmp_path / "backup.json"
    run = _bench("--quick", "--parts", "backup", "--scratch", str(bench_scratch), "--json", str(report))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Full backup and restore through a local docker-registry vs skopeo copy" in run.stdout
    part = next(s for s in json.loads(report.read_text())["sections"] if s["name"] == "Backup")
    cases = {c["case"]: c for c in part["figures"]["cases"]}
    assert {"vfs on ext4", "overlay on ext4"} <= set(cases)
    for case in cases.values():
        assert case["error"] is None
        f = case["figures"]
        assert f["export_bytes"] >= f["size"] and f["tar_s"] > 0 and f["zstd_tool_s"] > 0
        assert f["push_bytes"] >= f["size"] and f["restore_bytes"] >= f["size"] and f["skopeo_push_s"] > 0
        assert 1 << 20 <= f["incr_bytes"] <= 2 << 20 and f["incr_blobs_sent"] == 1
        assert f["incr_restore_layers"] == 1 and f["incr_restore_bytes"] <= 2 << 20
    subjects = {g["subject"]: g["verdict"] for g in part["goals"]}
    assert "backup overlay on ext4: bytes sent after a 1 MiB change" in subjects
    assert not any(s.startswith("backup vfs") and "bytes sent" in s for s in subjects)
    assert all(v in ("PASS", "MISS") for v in subjects.values())
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(bench_scratch) not in processes  # the registry (its config lies in the scratch) is stopped
    _assert_nothing_left(bench_scratch)


def test_floor_times_a_bare_grpc_server_in_its_own_process_and_leaves_nothing(tmp_path: Path) -> None:
    """The floor the CSI figures are read against: the empty and the durable call are timed
    from this process against a server process; its socket and database are gone afterwards."""
    floor = measure_floor(tmp_path, rounds=20, clients=2)
    assert floor.rpc.rounds == 20 and floor.durable.rounds == 20 and floor.clients == 2
    assert 0 < floor.rpc.p50 <= floor.rpc.max and 0 < floor.durable.p50 <= floor.durable.max
    assert floor.calls_per_s > 0
    assert list(tmp_path.iterdir()) == []
