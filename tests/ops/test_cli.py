"""The operator commands (``strata doctor``, ``ls``, ``tree``, ``gc``) as real processes
against real stores made by the real plugin on vfs (ext4), overlay (ext4) and btrfs (a loop
filesystem), with the plugin serving and stopped, and against a store a kill -9 left
mid-work."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ops_support import DRIVERS, REPO, strata, strata_json
from csi_harness import Harness, ServeProcess

from csi.graphdriver.registry import driver_class, home_of, new_driver
from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb


def on_disk(base: Path) -> dict[str, Any]:
    """Every file (content hash) and mount under ``base``, and every driver's layer records.
    Layer databases are compared by their records: a read-only sqlite open makes -wal/-shm
    side files, and opening a driver (gc --dry-run) checkpoints its WAL into layers.db — the
    same records in other bytes."""
    tree: dict[str, str] = {}
    layers: dict[str, list[tuple[Any, ...]]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, name), base) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name == "layers.db":
                home = Path(dirpath)
                layers[str(home)] = sorted((l.id, l.parent, l.kind.value, l.state.value, l.hidden, l.mounts, l.origin,
                                            l.size_bytes) for l in driver_class(home.name).read_layers(home))
            if name == "csi.sock" or name.startswith("layers.db"):
                continue
            with open(path, "rb") as f:
                tree[os.path.relpath(path, base)] = hashlib.sha256(f.read()).hexdigest()
    return {"tree": tree, "layers": layers, "mounts": sorted(mp.target for mp in mnt.mounts_under(base))}


def populate(h: Harness) -> dict[str, str]:
    """data (staged, published, written) -> snap1 -> restored; data -> clone; snap2 -> restored2,
    then snap2 deleted (its layer stays, hidden, under restored2). Returns name -> CSI ID."""
    data = h.create_volume("data", size=8 << 20).volume_id
    staging, target = h.mounted(data, "pod1")
    (target / "hello").write_text("hi")
    snap1 = h.snapshot("snap1", data).snapshot_id
    restored = h.create_volume("restored", source=pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap1))).volume_id
    clone = h.create_volume("clone", source=pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id=data))).volume_id
    snap2 = h.snapshot("snap2", data).snapshot_id
    restored2 = h.create_volume("restored2", source=pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap2))).volume_id
    h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap2))
    return {"data": data, "snap1": snap1, "restored": restored, "clone": clone, "snap2": snap2,
            "restored2": restored2, "staging": str(staging), "target": str(target)}


def walk(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n in nodes:
        out.append(n)
        out += walk(n["children"])
    return out


@pytest.mark.parametrize("driver", DRIVERS)
def test_ls_and_tree_on_a_real_store(harness_on: Callable[[str], Harness], driver: str) -> None:
    h = harness_on(driver)
    ids = populate(h)
    root = str(h.root)

    # while the plugin serves
    rc, listing = strata_json("ls", "--root", root)
    assert rc == 0 and listing["driver"] == driver and listing["plugin_serving"] is True
    items = {i["name"]: i for i in listing["items"]}
    assert set(items) == {"data", "restored", "clone", "restored2", "snap1"}
    assert items["data"]["staged"] == [ids["staging"]] and items["data"]["published"] == [ids["target"]]
    assert items["data"]["size_bytes"] == 8 << 20 and items["data"]["driver"] == driver
    assert isinstance(items["data"]["used_bytes"], int) and items["data"]["used_bytes"] > 0  # NodeGetVolumeStats
    assert items["restored"]["parent"] == "snap1" and items["clone"]["parent"] == "data"
    assert items["snap1"]["parent"] == "data" and items["snap1"]["kind"] == "snapshot"
    assert items["restored2"]["parent"] == ids["snap2"]  # its snapshot is deleted: the ID is all that is left
    assert all(i["state"] == "ready" and i["layer_state"] == "ready" for i in items.values())
    assert items["restored"]["used_bytes"] is None  # not staged: unknown

    rc, tree = strata_json("tree", "--root", root)
    assert rc == 0
    layers = {n["id"]: n for n in walk(tree["layers"])}
    snap2_layer = ids["snap2"].split("@")[0]
    assert layers[snap2_layer]["hidden"] is True and layers[snap2_layer]["name"] is None
    assert [c["name"] for c in layers[snap2_layer]["children"]] == ["restored2"]
    assert set(layers) == {l.id for l in driver_class(driver).read_layers(home_of(h.root, driver))}
    text = strata("tree", "--root", root)
    assert text.returncode == 0 and "HIDDEN" in text.stdout and '"restored2"' in text.stdout
    assert "└── " in text.stdout

    table = strata("ls", "--root", root)
    assert table.returncode == 0 and ids["target"] in table.stdout and "snap1" in table.stdout

    # stopped: the same records, no usage figure, nothing written by looking
    h.stop()
    before = on_disk(h.base)
    rc, stopped = strata_json("ls", "--root", root)
    assert rc == 0 and stopped["plugin_serving"] is False
    assert {i["name"] for i in stopped["items"]} == set(items)
    assert all(i["used_bytes"] is None for i in stopped["items"])
    rc, tree_stopped = strata_json("tree", "--root", root)
    assert tree_stopped["layers"] == tree["layers"]
    assert strata("doctor", "--root", root).returncode == 0
    assert on_disk(h.base) == before


def _crashed_store(home: Path, driver: str, log: Path, run: int) -> None:
    """Run crash_worker.py on ``home`` and kill -9 it mid-work (after a random few steps)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("crash_worker.py")), str(home), driver, str(run)],
                                stdout=subprocess.PIPE, stderr=out, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"ready\n", log.read_text()
    time.sleep(random.uniform(0.05, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("driver", DRIVERS)
def test_gc_after_kill9(request: pytest.FixtureRequest, ext4_dir: Path, driver: str) -> None:
    base = Path(request.getfixturevalue("btrfs_dir") if driver == "btrfs" else ext4_dir)
    root = base / "root"
    home = home_of(root, driver)
    found: dict[str, Any] | None = None
    for attempt in range(25):  # a kill between two steps leaves nothing to find: kill again
        _crashed_store(home, driver, base / "worker.log", attempt)
        before = on_disk(base)
        rc, report = strata_json("gc", "--dry-run", "--root", str(root))
        assert on_disk(base) == before, "gc --dry-run changed the store"
        if rc == 3:
            found = report
            break
        assert rc == 0 and report["clean"], report
    assert found is not None, "25 kills never left half-done work"
    assert found["dry_run"] is True and found["clean"] is False
    leftovers = set(found["interrupted"]) | set(found["orphans"]) | set(found["removals"])
    assert leftovers, found

    text = strata("gc", "--dry-run", "--root", str(root))
    assert text.returncode == 3 and "would be" in text.stdout and on_disk(base) == before

    rc, swept = strata_json("gc", "--root", str(root))
    assert rc == 0 and swept["dry_run"] is False
    for key in ("interrupted", "orphans", "removals"):
        assert swept[key] == found[key]
    assert on_disk(base) != before
    rc, again = strata_json("gc", "--dry-run", "--root", str(root))
    assert rc == 0 and again["clean"] is True
    records = {l.id for l in driver_class(driver).read_layers(home)}
    assert not (set(found["orphans"]) & records)
    # a finished sweep leaves every record ready
    assert {l.state.value for l in driver_class(driver).read_layers(home)} == {"ready"}


def test_gc_refuses_while_the_plugin_serves(harness_on: Callable[[str], Harness], tmp_path: Path) -> None:
    h = harness_on("vfs")
    populate(h)
    h.stop()
    serve = ServeProcess(h, tmp_path / "serve.log")
    stubs = serve.start()
    try:
        orphan = home_of(h.root, "vfs") / "dir" / "vol-orphan"
        orphan.mkdir()
        refused = strata("gc", "--root", str(h.root))
        assert refused.returncode == 2 and "serving" in refused.stderr
        assert orphan.is_dir()
        rc, report = strata_json("gc", "--dry-run", "--root", str(h.root))
        assert rc == 3 and report["orphans"] == ["vol-orphan"] and report["plugin_serving"] is True
        assert orphan.is_dir()
        rc, doctor = strata_json("doctor", "--root", str(h.root))
        assert rc == 0 and doctor["choice"] == "vfs" and doctor["choice_reason"] == "prior state"
    finally:
        stubs.channel.close()
        assert serve.terminate() == 0
    rc, report = strata_json("gc", "--root", str(h.root))
    assert rc == 0 and report["orphans"] == ["vol-orphan"] and not orphan.exists()


def test_doctor(ext4_dir: Path, btrfs_dir: Path) -> None:
    rc, ext4 = strata_json("doctor", "--root", str(ext4_dir / "root"))
    assert rc == 0 and ext4["filesystem"] == "ext4"
    assert ext4["choice"] == new_driver(ext4_dir / "probe-root").driver.name  # what serve would pick
    checks = {c["name"]: c for c in ext4["drivers"]}
    assert checks["btrfs"]["can_run"] is False and "not btrfs" in checks["btrfs"]["reason"]
    assert checks["vfs"]["can_run"] is True
    assert checks["devicemapper"]["can_run"] is False and checks["devicemapper"]["reason"]
    features = {f["name"]: f for f in ext4["features"]}
    assert set(features) >= {"overlay", "btrfs", "btrfs qgroups", "device-mapper thin", "project quota", "aufs",
                             "reflinks"}
    assert features["reflinks"]["available"] is False  # ext4 has no FICLONE
    assert not (ext4_dir / "root").exists()  # doctor made nothing under the root

    rc, btrfs = strata_json("doctor", "--root", str(btrfs_dir / "root"))
    assert rc == 0 and btrfs["choice"] == "btrfs" and btrfs["choice_reason"] == "priority"
    features = {f["name"]: f for f in btrfs["features"]}
    assert features["reflinks"]["available"] is True and features["btrfs qgroups"]["available"] is True

    # an explicit driver that cannot run here, and a root two drivers claim: exit 1
    dm = strata("doctor", "--root", str(ext4_dir / "root"), "--driver", "devicemapper")
    assert dm.returncode == 1 and "no driver can start here" in dm.stdout
    for name in ("vfs", "overlay"):
        driver_class(name)(home_of(ext4_dir / "two", name)).create("vol-x")
    two = strata("doctor", "--root", str(ext4_dir / "two"))
    assert two.returncode == 1 and "several drivers" in two.stdout


def test_log_format_json(harness_on: Callable[[str], Harness]) -> None:
    h = harness_on("vfs")
    populate(h)
    done = strata("ls", "--root", str(h.root), "--log-format", "json", "--log-level", "info")
    assert done.returncode == 0
    lines = [json.loads(l) for l in done.stderr.splitlines() if l.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(l) for l in lines)
    text = strata("ls", "--root", str(h.root), "--log-level", "info")
    assert text.stderr and not text.stderr.lstrip().startswith("{")
