"""The CSI volume lifecycle where sizes are enforced by XFS project quota (vfs and overlay
on XFS mounted with ``prjquota``): a volume holds its requested capacity and no more,
ControllerExpandVolume raises the enforced size of a published volume (online),
NodeExpandVolume and NodeGetVolumeStats report it, and DeleteVolume releases the project
ID. Runs inside the qemu guest only (this host's kernel has no filesystem quotas); the
same calls on drivers without enforcement are covered on the host (tests/csi)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from quota_writes import fill, near

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "csi"))  # the CSI tests' harness

from csi_harness import MiB, Harness  # noqa: E402

from csi.proto import csi_pb2 as pb  # noqa: E402


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_expand_raises_the_enforced_size(xfs_prjquota: Path, driver: str) -> None:
    h = Harness(xfs_prjquota / f"csi-{driver}", driver).start()
    try:
        assert h.handle is not None
        layers = h.handle.plugin.driver
        assert layers.size_enforcement().startswith("xfs project quota")
        vol = h.create_volume("pvc-quota", size=16 * MiB)
        assert vol.capacity_bytes == 16 * MiB
        staging, target = h.mounted(vol.volume_id, "pod-1")
        first = fill(target / "a", 64 * MiB)
        assert near(first, 16 * MiB), "the volume holds its capacity and no more"

        expanded = h.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=48 * MiB)))
        assert expanded.capacity_bytes == 48 * MiB and not expanded.node_expansion_required
        node_exp = h.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id=vol.volume_id,
                                                                       volume_path=str(target)))
        assert node_exp.capacity_bytes == 48 * MiB
        second = fill(target / "b", 64 * MiB)
        assert first + second > 32 * MiB, "writes past the old capacity succeed after the expansion"
        assert near(first + second, 48 * MiB), "and stop at the new one"

        stats = h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id,
                                                                        volume_path=str(target)))
        usage = {u.unit: u for u in stats.usage}[pb.VolumeUsage.BYTES]
        assert not stats.volume_condition.abnormal
        assert usage.total == 48 * MiB
        assert first + second <= usage.used <= 48 * MiB and usage.available <= 48 * MiB - usage.used

        h.release(vol.volume_id, staging, target)
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert layers.limits.quota.assigned() == {}, "DeleteVolume released the project ID"
    finally:
        h.teardown()
