"""The CSI lifecycle on devicemapper, over a real gRPC client, against a real
``strata serve --driver devicemapper`` process (loop-lvm thin pool on the guest's scratch
disk). Runs inside the qemu guest only: this host kernel has no device-mapper.

* filesystem volume: create, stage, publish, write, snapshot, restore, clone, contents
  byte for byte, expand (device and ext4 grow online), stats, unpublish, unstage, delete;
* block volume (volumeMode Block): the thin device bound at a target *file*; a pattern
  written to it, snapshot, restore and clone read it back; expand grows the device; the
  server is killed -9 and restarted with the volume published; access-type mismatches are
  refused;
* GetCapacity never reports more than the pool has free.

Sizes are small (a 1 GiB pool, 32-64 MiB volumes): the guest runs under software emulation.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "csi"))  # the CSI harness (tests/csi)
from csi_harness import Harness, MiB, ServeProcess, block_cap, code_of, files_of, mount_cap  # noqa: E402

from csi.host import mount as mnt  # noqa: E402
from csi.graphdriver.devicemapper import ioctl as dm  # noqa: E402
from csi.proto import csi_pb2 as pb  # noqa: E402

STORAGE_OPTS = (("dm.loopback", "true"), ("dm.loopdatasize", "1G"), ("dm.loopmetadatasize", "16M"),
                ("dm.basesize", "32M"), ("dm.min_free_space", "5"))
START_TIMEOUT_S = 180  # python + grpc start-up and the pool set-up under emulation
C = grpc.StatusCode


@pytest.fixture
def served(guest_scratch: Path, dm_release: Callable[[Path], None]) -> Iterator[tuple[Harness, ServeProcess]]:
    """``strata serve --driver devicemapper`` as a child process, with stubs on its socket."""
    h = Harness(guest_scratch / "csi-dm", "devicemapper")
    h.config = replace(h.config, storage_opts=STORAGE_OPTS)
    proc = ServeProcess(h, guest_scratch / "serve.log")
    h.stubs = proc.start(timeout=START_TIMEOUT_S)
    try:
        yield h, proc
    finally:
        if h.stubs is not None:
            h.stubs.channel.close()
            h.stubs = None
        if proc.proc is not None and proc.proc.poll() is None:
            assert proc.terminate() == 0, (guest_scratch / "serve.log").read_text()[-3000:]
        dm_release(h.root / "devicemapper")


def pool_name() -> str:
    (name,) = [n for n in dm.list_devices("strata-") if n.endswith(".pool")]
    return name


def pool_free_bytes() -> int:
    name = pool_name()
    return dm.pool_status(name).free_data_blocks * dm.pool_block_sectors(name) * dm.SECTOR


def thin_devices() -> set[str]:
    return {n for n in dm.list_devices("strata-") if not n.endswith(".pool")}


def device_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def create(h: Harness, name: str, size: int, cap: pb.VolumeCapability,
           source: pb.VolumeContentSource | None = None) -> pb.Volume:
    return h.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size), volume_capabilities=[cap],
        volume_content_source=source)).volume


def expand(h: Harness, volume_id: str, size: int, path: Path) -> None:
    got = h.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)))
    assert got.capacity_bytes == size
    node = h.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=str(path)))
    assert node.capacity_bytes == size


def stats(h: Harness, volume_id: str, path: Path) -> pb.NodeGetVolumeStatsResponse:
    got = h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path)))
    assert not got.volume_condition.abnormal, got.volume_condition.message
    return got


def assert_all_gone(h: Harness, used_blocks_before: int) -> None:
    assert h.controller.ListVolumes(pb.ListVolumesRequest()).entries == []
    assert h.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries == []
    assert mnt.mounts_under(h.base) == []
    assert thin_devices() == set(), "every thin device is deactivated"
    assert dm.pool_status(pool_name()).used_data_blocks == used_blocks_before, "the pool's space is returned"


PAYLOAD = {"a.txt": b"hello devicemapper\n", "dir/b.bin": os.urandom(MiB + 17), "dir/empty": b""}


def test_filesystem_volume_lifecycle(served: tuple[Harness, ServeProcess]) -> None:
    h, _ = served
    used_before = dm.pool_status(pool_name()).used_data_blocks
    capacity = h.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()]))
    assert 0 < capacity.available_capacity <= pool_free_bytes()
    assert capacity.maximum_volume_size.value == 1 << 30

    vol = create(h, "pvc-fs", 32 * MiB, mount_cap())
    staging, target = h.mounted(vol.volume_id, "pod-1")
    assert mnt.find_mount(staging).fstype == "ext4"  # type: ignore[union-attr]
    for rel, data in PAYLOAD.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
    os.sync()
    after_write = h.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
    assert after_write <= pool_free_bytes() and after_write < capacity.available_capacity

    snap = h.snapshot("snap-fs", vol.volume_id)  # the origin is mounted: suspended, snapped, resumed
    assert snap.ready_to_use and snap.size_bytes == 32 * MiB
    (target / "a.txt").write_bytes(b"changed after the snapshot\n")
    restored = create(h, "pvc-fs-restored", 32 * MiB, mount_cap(),
                      pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id}))
    clone = create(h, "pvc-fs-clone", 32 * MiB, mount_cap(), pb.VolumeContentSource(volume={"volume_id": vol.volume_id}))
    r_staging, r_target = h.mounted(restored.volume_id, "pod-2")
    c_staging, c_target = h.mounted(clone.volume_id, "pod-3")
    assert files_of(r_target) == PAYLOAD, "restore holds the snapshot's bytes"
    assert files_of(c_target) == {**PAYLOAD, "a.txt": b"changed after the snapshot\n"}, "clone holds the current bytes"
    (c_target / "only-in-clone").write_bytes(b"x")
    assert not (target / "only-in-clone").exists()

    fs_before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    expand(h, vol.volume_id, 64 * MiB, target)
    fs_after = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assert fs_after > fs_before + 24 * MiB, "the thin device and its ext4 grew while mounted"
    by_unit = {u.unit: u for u in stats(h, vol.volume_id, target).usage}
    assert by_unit[pb.VolumeUsage.BYTES].total == 64 * MiB and by_unit[pb.VolumeUsage.BYTES].used >= MiB
    assert by_unit[pb.VolumeUsage.INODES].total > 0

    assert code_of(lambda: h.stage(vol.volume_id, h.staging_path("as-block"), block_cap())) == C.INVALID_ARGUMENT
    for vid, stg, tgt in ((vol.volume_id, staging, target), (restored.volume_id, r_staging, r_target),
                          (clone.volume_id, c_staging, c_target)):
        h.release(vid, stg, tgt)
        assert not mnt.is_mount_point(stg) and not tgt.exists()
    for vid in (vol.volume_id, restored.volume_id, clone.volume_id):
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert_all_gone(h, used_before)


def test_block_volume_lifecycle(served: tuple[Harness, ServeProcess]) -> None:
    h, proc = served
    used_before = dm.pool_status(pool_name()).used_data_blocks
    capacity = h.controller.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[block_cap()]))
    assert 0 < capacity.available_capacity <= pool_free_bytes()

    vol = create(h, "pvc-blk", 32 * MiB, block_cap())
    assert code_of(lambda: create(h, "pvc-blk", 32 * MiB, mount_cap())) == C.ALREADY_EXISTS
    validated = h.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()]))
    assert not validated.HasField("confirmed") and "block" in validated.message
    staging, target = h.staging_path("blk"), h.target_path("blk-pod")
    assert code_of(lambda: h.stage(vol.volume_id, staging, mount_cap())) == C.INVALID_ARGUMENT
    assert not staging.exists() or not mnt.is_mount_point(staging), "no filesystem mounted over a block volume"
    h.stage(vol.volume_id, staging, block_cap())
    h.stage(vol.volume_id, staging, block_cap())  # idempotent
    assert not mnt.is_mount_point(staging), "staging a block volume mounts nothing"
    h.publish(vol.volume_id, staging, target, cap=block_cap())
    h.publish(vol.volume_id, staging, target, cap=block_cap())  # idempotent
    assert stat.S_ISBLK(os.stat(target).st_mode) and mnt.is_mount_point(target)
    assert device_bytes(target) == 32 * MiB
    (usage,) = stats(h, vol.volume_id, target).usage
    assert usage.unit == pb.VolumeUsage.BYTES and usage.total == 32 * MiB and usage.used == usage.available == 0

    pattern = os.urandom(MiB)
    write_at(target, 0, b"STRATA-BLOCK")
    write_at(target, 4 * MiB, pattern)
    proc.kill9()  # kill -9 with the volume staged and published, then restart: all still there
    h.stubs = proc.start(timeout=START_TIMEOUT_S)
    assert mnt.is_mount_point(target) and read_at(target, 4 * MiB, MiB) == pattern

    snap = h.snapshot("snap-blk", vol.volume_id)  # taken while the device is active and published
    write_at(target, 4 * MiB, b"\xff" * MiB)  # the source moves on
    assert code_of(lambda: create(h, "pvc-blk-as-fs", 32 * MiB, mount_cap(),
                                  pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id}))) \
        == C.INVALID_ARGUMENT
    restored = create(h, "pvc-blk-restored", 32 * MiB, block_cap(),
                      pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id}))
    clone = create(h, "pvc-blk-clone", 32 * MiB, block_cap(), pb.VolumeContentSource(volume={"volume_id": vol.volume_id}))
    r_staging, r_target = h.staging_path("blk-r"), h.target_path("blk-r-pod")
    h.stage(restored.volume_id, r_staging, block_cap())
    h.publish(restored.volume_id, r_staging, r_target, readonly=True, cap=block_cap())
    assert mnt.find_mount(r_target).readonly  # type: ignore[union-attr]
    assert read_at(r_target, 0, 12) == b"STRATA-BLOCK"
    assert read_at(r_target, 4 * MiB, MiB) == pattern, "restore holds the snapshot's pattern"
    assert read_at(r_target, 31 * MiB, MiB) == bytes(MiB), "never-written blocks read as zeros"
    c_staging, c_target = h.staging_path("blk-c"), h.target_path("blk-c-pod")
    h.stage(clone.volume_id, c_staging, block_cap())
    h.publish(clone.volume_id, c_staging, c_target, cap=block_cap())
    assert read_at(c_target, 4 * MiB, MiB) == b"\xff" * MiB, "clone holds the source's current bytes"
    write_at(c_target, 0, b"CLONE")
    assert read_at(target, 0, 12) == b"STRATA-BLOCK", "clone and source are independent"

    expand(h, vol.volume_id, 64 * MiB, target)
    assert device_bytes(target) == 64 * MiB, "the published device grew"
    assert stats(h, vol.volume_id, target).usage[0].total == 64 * MiB
    assert read_at(target, 4 * MiB, MiB) == b"\xff" * MiB

    for vid, stg, tgt in ((vol.volume_id, staging, target), (restored.volume_id, r_staging, r_target),
                          (clone.volume_id, c_staging, c_target)):
        h.release(vid, stg, tgt)
        assert not tgt.exists() and not mnt.is_mount_point(stg)
    for vid in (vol.volume_id, restored.volume_id, clone.volume_id):
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert_all_gone(h, used_before)
