"""The whole CSI lifecycle over the real socket on vfs, overlay and btrfs:
create, stage, publish, write, snapshot, restore, clone, byte-for-byte checks, expand,
stats, unpublish, unstage, delete — and nothing left behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import grpc
import pytest
from csi_harness import NODE, Harness, MiB, code_of, files_of, mount_cap

from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb

PAYLOAD = {
    "a.txt": b"hello strata\n",
    "dir/b.bin": os.urandom(3 * MiB + 17),
    "dir/sub/c": b"",
}


def write_tree(root: os.PathLike[str], files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_lifecycle(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    vol = h.create_volume("pvc-data", size=64 * MiB)
    assert vol.volume_id.endswith("@" + NODE) and vol.capacity_bytes == 64 * MiB
    assert dict(vol.accessible_topology[0].segments) == {"strata.csi.dev/node": NODE,
                                                         "strata.csi.dev/layered-driver": driver}
    staging, target = h.mounted(vol.volume_id, "pod-1")
    assert mnt.is_mount_point(staging) and mnt.is_mount_point(target)
    write_tree(target, PAYLOAD)

    snap = h.snapshot("snap-1", vol.volume_id)
    assert snap.ready_to_use and snap.source_volume_id == vol.volume_id and snap.size_bytes == 64 * MiB
    assert snap.creation_time.seconds > 0
    (target / "a.txt").write_bytes(b"changed after the snapshot\n")
    (target / "after").write_bytes(b"new")

    restored = h.create_volume("pvc-restored", size=64 * MiB,
                               source=pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id}))
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    clone = h.create_volume("pvc-clone", size=64 * MiB,
                            source=pb.VolumeContentSource(volume={"volume_id": vol.volume_id}))
    assert clone.content_source.volume.volume_id == vol.volume_id

    r_staging, r_target = h.mounted(restored.volume_id, "pod-2")
    c_staging, c_target = h.mounted(clone.volume_id, "pod-3")
    assert files_of(r_target) == PAYLOAD, "restore holds the snapshot's bytes"
    current = dict(PAYLOAD, **{"a.txt": b"changed after the snapshot\n", "after": b"new"})
    assert files_of(c_target) == current, "clone holds the source's current bytes"
    (c_target / "only-in-clone").write_bytes(b"x")
    assert not (target / "only-in-clone").exists(), "clone and source are independent"

    expanded = h.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=128 * MiB)))
    assert expanded.capacity_bytes == 128 * MiB
    node_exp = h.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id=vol.volume_id,
                                                                   volume_path=str(target)))
    assert node_exp.capacity_bytes == 128 * MiB

    stats = h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id,
                                                                    volume_path=str(target)))
    by_unit = {u.unit: u for u in stats.usage}
    assert not stats.volume_condition.abnormal
    assert by_unit[pb.VolumeUsage.BYTES].total == 128 * MiB
    assert by_unit[pb.VolumeUsage.BYTES].used > 0
    if driver == "btrfs":  # no fixed inode count on btrfs: no inode figure is reported
        assert pb.VolumeUsage.INODES not in by_unit
    else:
        assert by_unit[pb.VolumeUsage.INODES].total > 0

    got = h.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 128 * MiB and list(got.status.published_node_ids) == [NODE]

    for vid, stg, tgt in ((vol.volume_id, staging, target), (restored.volume_id, r_staging, r_target),
                          (clone.volume_id, c_staging, c_target)):
        h.release(vid, stg, tgt)
        assert not mnt.is_mount_point(stg) and not tgt.exists()
    # the snapshot outlives its source volume; restoring from it still works
    assert code_of(lambda: h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))) \
        == grpc.StatusCode.OK
    again = h.create_volume("pvc-again", source=pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id}))
    a_staging, a_target = h.mounted(again.volume_id, "pod-4")
    assert files_of(a_target) == PAYLOAD
    h.release(again.volume_id, a_staging, a_target)
    for vid in (restored.volume_id, clone.volume_id, again.volume_id):
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))

    assert h.handle is not None
    assert h.handle.plugin.driver.store.all() == [], "every layer (hidden ones included) is freed"
    assert h.controller.ListVolumes(pb.ListVolumesRequest()).entries == []
    assert h.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries == []
    assert mnt.mounts_under(h.base) == []


def test_readonly_publish_and_mount_flags(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vol = h.create_volume("pvc-ro")
    staging = h.staging_path("ro")
    h.stage(vol.volume_id, staging, mount_cap(flags=("nosuid", "nodev", "noexec"), group="1234"))
    mp = mnt.find_mount(staging)
    assert mp is not None and {"nosuid", "nodev", "noexec"} <= set(mp.options)
    st = os.stat(staging)
    assert st.st_gid == 1234 and st.st_mode & stat.S_ISGID and st.st_mode & 0o070 == 0o070
    target = h.target_path("ro-pod")
    h.publish(vol.volume_id, staging, target, readonly=True,
              cap=mount_cap(flags=("nosuid", "nodev", "noexec"), group="1234"))
    assert mnt.find_mount(target).readonly  # type: ignore[union-attr]
    with pytest.raises(OSError):
        (target / "x").write_bytes(b"no")
    h.release(vol.volume_id, staging, target)


def test_ephemeral_inline_volume(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    target = h.target_path("inline-pod")
    request = pb.NodePublishVolumeRequest(
        volume_id="csi-0a1b2c3d4e5f", target_path=str(target), volume_capability=mount_cap(),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "inline-pod",
                        "size": str(8 * MiB)})
    h.node.NodePublishVolume(request)
    h.node.NodePublishVolume(request)  # idempotent
    assert mnt.is_mount_point(target)
    (target / "scratch").write_bytes(b"temporary")
    assert h.handle is not None
    assert len(h.handle.plugin.driver.layers()) == 1
    assert h.controller.ListVolumes(pb.ListVolumesRequest()).entries == [], "inline volumes are not listed"
    stats = h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="csi-0a1b2c3d4e5f",
                                                                    volume_path=str(target)))
    assert not stats.volume_condition.abnormal
    for _ in range(2):
        h.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="csi-0a1b2c3d4e5f",
                                                                 target_path=str(target)))
    assert not target.exists()
    assert h.handle.plugin.driver.store.all() == []
    assert h.handle.plugin.store.volumes() == []


def test_stats_report_a_lost_mount_as_abnormal(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vol = h.create_volume("pvc-cond")
    staging, target = h.mounted(vol.volume_id, "cond")
    mnt.unmount(target)  # someone removed the mount behind the plugin's back
    stats = h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id,
                                                                    volume_path=str(target)))
    assert stats.volume_condition.abnormal and "no longer mounted" in stats.volume_condition.message
    h.release(vol.volume_id, staging, target)


def test_conditions_report_a_missing_layer(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vol = h.create_volume("pvc-gone")
    assert h.handle is not None
    h.handle.plugin.driver.remove(vol.volume_id.split("@")[0])  # the layer vanishes behind the plugin's back
    got = h.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.status.volume_condition.abnormal and "missing" in got.status.volume_condition.message
    h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert h.controller.ListVolumes(pb.ListVolumesRequest()).entries == []
