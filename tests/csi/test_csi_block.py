"""Block volumes (volumeMode Block) where they cannot be honest: vfs, overlay and btrfs have no
device per layer, so every RPC that carries a block capability is refused with
INVALID_ARGUMENT naming the driver, and nothing changes on disk. The block lifecycle
itself runs on devicemapper inside the qemu guest (tests/qemu/inguest/check_csi_devicemapper.py).
Also here: the driver contract's block calls on a driver without block support, the state
store opening a database from before the ``block`` column, and ``--storage-opt``."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from csi_harness import Harness, MiB, block_cap, mount_cap

from csi.errors import Unsupported
from csi.graphdriver.driver import CreateOpts
from csi.graphdriver.vfs import VfsDriver
from csi.proto import csi_pb2 as pb
from csi.services.server import parse_args
from csi.state.store import StateStore


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_block_is_refused_naming_the_driver(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    vol = h.create_volume("pvc-fs", size=MiB)
    staging, target = h.staging_path("blk"), h.target_path("blk-pod")
    before = h.disk_state()
    calls = {
        "CreateVolume": lambda: h.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-block", volume_capabilities=[block_cap()])),
        "CreateVolume mixed": lambda: h.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-mixed", volume_capabilities=[mount_cap(), block_cap()])),
        "NodeStageVolume": lambda: h.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=block_cap())),
        "NodePublishVolume": lambda: h.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=block_cap())),
        "ControllerExpandVolume": lambda: h.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * MiB),
            volume_capability=block_cap())),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert f"not supported by the {driver} layered driver" in (exc.value.details() or ""), name
    validated = h.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap()]))
    assert not validated.HasField("confirmed") and driver in validated.message
    capacity = h.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[block_cap()]))
    assert capacity.available_capacity == 0
    assert h.disk_state() == before, "a refused block request changes nothing"


def test_driver_without_block_support_refuses_block_calls(ext4_dir: Path) -> None:
    driver = VfsDriver(ext4_dir / "vfs")
    assert not driver.supports_block
    with pytest.raises(Unsupported, match="vfs layered driver has no block device"):
        driver.create("b", opts=CreateOpts(block=True))
    assert driver.store.all() == [] and not driver.exists("b")
    driver.create("f")
    for call in (driver.get_block, driver.block_device):
        with pytest.raises(Unsupported):
            call("f")
    assert driver.layer("f").mounts == 0 and not driver.layer("f").block
    driver.cleanup()


def test_store_opens_a_database_from_before_block_volumes(tmp_path: Path) -> None:
    """The ``block`` column is added to an older state.db; its volumes are filesystem volumes."""
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript("""
        CREATE TABLE volumes(layer TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, capacity INTEGER NOT NULL,
            parameters TEXT NOT NULL, source_kind TEXT NOT NULL, source_id TEXT NOT NULL, parent_layer TEXT,
            base_layer TEXT, created REAL NOT NULL, state TEXT NOT NULL, ephemeral INTEGER NOT NULL);
        INSERT INTO volumes VALUES ('vol-0123456789abcdef0123456789abcdef', 'old', 5, '{}', '', '', NULL, NULL,
            1.0, 'ready', 0);
    """)
    db.close()
    store = StateStore(tmp_path)
    try:
        (old,) = store.volumes()
        assert old.name == "old" and old.block is False
    finally:
        store.close()
    StateStore(tmp_path).close()  # a second open finds the column and leaves it


def test_serve_passes_storage_opts_to_the_driver() -> None:
    config, _ = parse_args(["--driver", "devicemapper", "--storage-opt", "dm.loopback=true",
                            "--storage-opt", "dm.basesize=64M"])
    assert config.plugin_config().driver_options == {"dm.loopback": "true", "dm.basesize": "64M"}
    with pytest.raises(SystemExit):
        parse_args(["--storage-opt", "no-value"])
