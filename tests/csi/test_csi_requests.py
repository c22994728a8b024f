"""Identity answers, idempotency (every RPC twice) and the audit of every RPC strata serves
against the CSI v1.12 spec's "Errors" tables and field rules: one row per RPC and case
(``RPC: case``), the expected code, and no change on disk (file tree, mounts, records) —
including ABORTED for a call racing another on the same object (the key it would take is
held) and a coverage check that every served RPC has rows."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from csi_harness import NODE, Harness, MiB, block_cap, code_of, mount_cap

from csi import __version__
from csi.proto import csi_pb2 as pb

C = grpc.StatusCode
FOREIGN = "vol-0123456789abcdef0123456789abcdef@other-node"
UNKNOWN = "vol-0123456789abcdef0123456789abcdef@" + NODE
UNKNOWN_SNAP = "snap-0123456789abcdef0123456789abcdef@" + NODE
TRAVERSAL = "../../../etc"


def test_identity(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    info = h.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "strata.csi.dev" and info.vendor_version == __version__
    caps = h.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {pb.PluginCapability.Service.CONTROLLER_SERVICE,
                        pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE,
                        pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    assert h.identity.Probe(pb.ProbeRequest()).ready.value is True
    assert stat.S_IMODE(os.stat(h.config.socket_path()).st_mode) == 0o600
    node_info = h.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert node_info.node_id == NODE
    assert dict(node_info.accessible_topology.segments) == {"strata.csi.dev/node": NODE,
                                                           "strata.csi.dev/layered-driver": "vfs"}
    node_caps = {c.rpc.type for c in h.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    R = pb.NodeServiceCapability.RPC
    assert node_caps == {R.STAGE_UNSTAGE_VOLUME, R.GET_VOLUME_STATS, R.EXPAND_VOLUME, R.VOLUME_CONDITION,
                         R.SINGLE_NODE_MULTI_WRITER, R.VOLUME_MOUNT_GROUP}
    # the backing filesystem's real free space: read it around the call until nothing else
    # wrote in between (other processes share the disk), then it must match exactly
    for _ in range(20):
        free_before = os.statvfs(h.root).f_bavail * os.statvfs(h.root).f_frsize
        capacity = h.controller.GetCapacity(pb.GetCapacityRequest())
        free_after = os.statvfs(h.root).f_bavail * os.statvfs(h.root).f_frsize
        if free_before == free_after:
            assert capacity.available_capacity == free_after
            break
    else:
        pytest.fail("free space never stood still for one GetCapacity call")
    other = h.controller.GetCapacity(pb.GetCapacityRequest(
        accessible_topology=pb.Topology(segments={"strata.csi.dev/node": "elsewhere"})))
    assert other.available_capacity == 0


def test_every_rpc_twice(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    create = pb.CreateVolumeRequest(name="pvc-twice", capacity_range=pb.CapacityRange(required_bytes=MiB),
                                    volume_capabilities=[mount_cap()], parameters={"csi.storage.k8s.io/pvc/name": "x"})
    first, second = h.controller.CreateVolume(create).volume, h.controller.CreateVolume(create).volume
    assert first == second
    vid = first.volume_id
    bigger = pb.CreateVolumeRequest(name="pvc-twice", capacity_range=pb.CapacityRange(required_bytes=2 * MiB),
                                    volume_capabilities=[mount_cap()])
    assert code_of(lambda: h.controller.CreateVolume(bigger)) == C.ALREADY_EXISTS

    snap_req = pb.CreateSnapshotRequest(name="snap-twice", source_volume_id=vid)
    s1, s2 = h.controller.CreateSnapshot(snap_req).snapshot, h.controller.CreateSnapshot(snap_req).snapshot
    assert s1 == s2
    other = h.create_volume("pvc-other")
    assert code_of(lambda: h.controller.CreateSnapshot(
        pb.CreateSnapshotRequest(name="snap-twice", source_volume_id=other.volume_id))) == C.ALREADY_EXISTS

    staging, target = h.staging_path("twice"), h.target_path("twice")
    for _ in range(2):
        h.stage(vid, staging)
    for _ in range(2):
        h.publish(vid, staging, target)
    assert code_of(lambda: h.publish(vid, staging, target, readonly=True)) == C.ALREADY_EXISTS
    for _ in range(2):
        expand = pb.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=4 * MiB))
        assert h.controller.ControllerExpandVolume(expand).capacity_bytes == 4 * MiB
    for _ in range(2):
        h.unpublish(vid, target)
    for _ in range(2):
        h.unstage(vid, staging)
    assert h.handle is not None and h.handle.plugin.driver.layer(vid.split("@")[0]).mounts == 0
    for _ in range(2):
        h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s1.snapshot_id))
    for _ in range(2):
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert [e.volume.volume_id for e in h.controller.ListVolumes(pb.ListVolumesRequest()).entries] == [other.volume_id]


def test_paging(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    made = {h.create_volume(f"pvc-page-{i}").volume_id for i in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = h.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made)
    vid = sorted(made)[0]
    snaps = {h.snapshot(f"s-{i}", vid).snapshot_id for i in range(3)}
    by_source = h.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id=vid))
    assert {e.snapshot.snapshot_id for e in by_source.entries} == snaps
    one = sorted(snaps)[1]
    by_id = h.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=one))
    assert [e.snapshot.snapshot_id for e in by_id.entries] == [one]
    assert h.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=one)).snapshot.snapshot_id == one
    page = h.controller.ListSnapshots(pb.ListSnapshotsRequest(max_entries=2))
    rest = h.controller.ListSnapshots(pb.ListSnapshotsRequest(starting_token=page.next_token))
    assert {e.snapshot.snapshot_id for e in [*page.entries, *rest.entries]} == snaps


def bad_requests(h: Harness, vid: str, sid: str, staging: Path, target: Path) -> list[tuple[str, Callable[[], Any], grpc.StatusCode]]:
    ctl, node = h.controller, h.node
    cap = mount_cap()
    rng = pb.CapacityRange

    def cv(**kw: Any) -> Callable[[], Any]:
        base: dict[str, Any] = {"name": "bad", "volume_capabilities": [cap]}
        base.update(kw)
        return lambda: ctl.CreateVolume(pb.CreateVolumeRequest(**base))

    elsewhere = pb.TopologyRequirement(requisite=[pb.Topology(segments={"strata.csi.dev/node": "other"})])
    fresh_target = h.target_path("bad-pod")
    return [
        ("create: no name", cv(name=""), C.INVALID_ARGUMENT),
        ("create: no capabilities", cv(volume_capabilities=[]), C.INVALID_ARGUMENT),
        ("create: block access", cv(volume_capabilities=[block_cap()]), C.INVALID_ARGUMENT),
        ("create: multi-node writer", cv(volume_capabilities=[mount_cap(mode=5)]), C.INVALID_ARGUMENT),
        ("create: no access mode", cv(volume_capabilities=[mount_cap(mode=0)]), C.INVALID_ARGUMENT),
        ("create: fs type", cv(volume_capabilities=[mount_cap(fs_type="ext4")]), C.INVALID_ARGUMENT),
        ("create: unknown mount flag", cv(volume_capabilities=[mount_cap(flags=("sync",))]), C.INVALID_ARGUMENT),
        ("create: unknown parameter", cv(parameters={"fancy": "yes"}), C.INVALID_ARGUMENT),
        ("create: wrong layered driver", cv(parameters={"layeredDriver": "btrfs"}), C.INVALID_ARGUMENT),
        ("create: limit below required", cv(capacity_range=rng(required_bytes=2 * MiB, limit_bytes=MiB)),
         C.OUT_OF_RANGE),
        ("create: negative size", cv(capacity_range=rng(required_bytes=-1)), C.OUT_OF_RANGE),
        ("create: larger than the disk", cv(capacity_range=rng(required_bytes=1 << 62)), C.OUT_OF_RANGE),
        ("create: other node only", cv(accessibility_requirements=elsewhere), C.RESOURCE_EXHAUSTED),
        ("create: missing snapshot", cv(volume_content_source=pb.VolumeContentSource(
            snapshot={"snapshot_id": UNKNOWN_SNAP})), C.NOT_FOUND),
        ("create: traversal snapshot", cv(volume_content_source=pb.VolumeContentSource(
            snapshot={"snapshot_id": TRAVERSAL})), C.NOT_FOUND),
        ("create: missing source volume", cv(volume_content_source=pb.VolumeContentSource(
            volume={"volume_id": UNKNOWN})), C.NOT_FOUND),
        ("create: foreign source volume", cv(volume_content_source=pb.VolumeContentSource(
            volume={"volume_id": FOREIGN})), C.NOT_FOUND),
        ("create: restore smaller than snapshot", cv(name="small", capacity_range=rng(limit_bytes=1024),
                                                     volume_content_source=pb.VolumeContentSource(
                                                         snapshot={"snapshot_id": sid})), C.OUT_OF_RANGE),
        ("delete: no id", lambda: ctl.DeleteVolume(pb.DeleteVolumeRequest()), C.INVALID_ARGUMENT),
        ("delete: traversal id", lambda: ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=TRAVERSAL)), C.OK),
        ("delete: foreign id", lambda: ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=FOREIGN)), C.OK),
        ("delete: staged volume", lambda: ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid)),
         C.FAILED_PRECONDITION),
        ("validate: unknown", lambda: ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=UNKNOWN, volume_capabilities=[cap])), C.NOT_FOUND),
        ("validate: no caps", lambda: ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vid)), C.INVALID_ARGUMENT),
        ("list volumes: bad token", lambda: ctl.ListVolumes(pb.ListVolumesRequest(starting_token="../x")),
         C.ABORTED),
        ("list volumes: negative max", lambda: ctl.ListVolumes(pb.ListVolumesRequest(max_entries=-1)),
         C.INVALID_ARGUMENT),
        ("list snapshots: bad token", lambda: ctl.ListSnapshots(pb.ListSnapshotsRequest(starting_token="!")),
         C.ABORTED),
        ("snapshot: no name", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid)),
         C.INVALID_ARGUMENT),
        ("snapshot: no source", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="s")), C.INVALID_ARGUMENT),
        ("snapshot: unknown source", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            name="s", source_volume_id=UNKNOWN)), C.NOT_FOUND),
        ("snapshot: traversal source", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            name="s", source_volume_id=TRAVERSAL)), C.NOT_FOUND),
        ("snapshot: unknown parameter", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            name="s", source_volume_id=vid, parameters={"x": "y"})), C.INVALID_ARGUMENT),
        ("delete snapshot: no id", lambda: ctl.DeleteSnapshot(pb.DeleteSnapshotRequest()), C.INVALID_ARGUMENT),
        ("delete snapshot: traversal", lambda: ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=TRAVERSAL)),
         C.OK),
        ("get snapshot: unknown", lambda: ctl.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=UNKNOWN_SNAP)),
         C.NOT_FOUND),
        ("expand: unknown", lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=UNKNOWN, capacity_range=rng(required_bytes=MiB))), C.NOT_FOUND),
        ("expand: no range", lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(volume_id=vid)),
         C.INVALID_ARGUMENT),
        ("expand: impossible", lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=rng(required_bytes=1 << 62))), C.OUT_OF_RANGE),
        ("get volume: traversal", lambda: ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=TRAVERSAL)), C.NOT_FOUND),
        ("controller publish: unimplemented", lambda: ctl.ControllerPublishVolume(
            pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=NODE)), C.UNIMPLEMENTED),
        ("stage: no id", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            staging_target_path=str(staging), volume_capability=cap)), C.INVALID_ARGUMENT),
        ("stage: no path", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, volume_capability=cap)), C.INVALID_ARGUMENT),
        ("stage: relative path", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path="rel/path", volume_capability=cap)), C.INVALID_ARGUMENT),
        ("stage: dotdot path", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging) + "/../x", volume_capability=cap)), C.INVALID_ARGUMENT),
        ("stage: no capability", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging))), C.INVALID_ARGUMENT),
        ("stage: block", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=block_cap())), C.INVALID_ARGUMENT),
        ("stage: traversal id", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=TRAVERSAL, staging_target_path=str(staging), volume_capability=cap)), C.NOT_FOUND),
        ("stage: other options on same path", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), volume_capability=mount_cap(flags=("noexec",)))),
         C.ALREADY_EXISTS),
        ("unstage: foreign id", lambda: node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=FOREIGN, staging_target_path=str(staging))), C.NOT_FOUND),
        ("publish: not staged", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging) + "-other", target_path=str(fresh_target),
            volume_capability=cap)), C.FAILED_PRECONDITION),
        ("publish: no staging path", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, target_path=str(fresh_target), volume_capability=cap)), C.INVALID_ARGUMENT),
        ("publish: target is staging", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(staging), volume_capability=cap)),
         C.INVALID_ARGUMENT),
        ("publish: unknown id", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=UNKNOWN, staging_target_path=str(staging), target_path=str(fresh_target),
            volume_capability=cap)), C.NOT_FOUND),
        ("publish: target parent missing", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path="/nonexistent-strata/x/mount",
            volume_capability=cap, readonly=True)),
         C.INVALID_ARGUMENT),
        ("publish: second read/write publication of a SINGLE_NODE_WRITER volume", lambda: node.NodePublishVolume(
            pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                        target_path=str(fresh_target), volume_capability=cap)),
         C.FAILED_PRECONDITION),
        ("publish: ephemeral unknown attribute", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id="csi-inline", target_path=str(fresh_target), volume_capability=cap,
            volume_context={"csi.storage.k8s.io/ephemeral": "true", "colour": "red"})), C.INVALID_ARGUMENT),
        ("unpublish: no target", lambda: node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid)),
         C.INVALID_ARGUMENT),
        ("unpublish: unknown strata id", lambda: node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=UNKNOWN, target_path=str(target))), C.NOT_FOUND),
        ("stats: path not used by the volume", lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=str(h.base))), C.NOT_FOUND),
        ("stats: traversal id", lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=TRAVERSAL, volume_path=str(target))), C.NOT_FOUND),
        ("node expand: unknown", lambda: node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=UNKNOWN, volume_path=str(target))), C.NOT_FOUND),
        *audit_rows(h, vid, sid, staging, target),
    ]


# the old rows' short prefixes, by RPC (for the coverage check)
PREFIXES = {"create": "CreateVolume", "delete": "DeleteVolume", "validate": "ValidateVolumeCapabilities",
            "list volumes": "ListVolumes", "list snapshots": "ListSnapshots", "snapshot": "CreateSnapshot",
            "delete snapshot": "DeleteSnapshot", "get snapshot": "GetSnapshot", "expand": "ControllerExpandVolume",
            "get volume": "ControllerGetVolume", "controller publish": "ControllerPublishVolume",
            "stage": "NodeStageVolume", "unstage": "NodeUnstageVolume", "publish": "NodePublishVolume",
            "unpublish": "NodeUnpublishVolume", "stats": "NodeGetVolumeStats", "node expand": "NodeExpandVolume"}


def rpc_of(what: str) -> str:
    head = what.split(":")[0]
    return PREFIXES.get(head, head)


def audit_rows(h: Harness, vid: str, sid: str, staging: Path,
               target: Path) -> list[tuple[str, Callable[[], Any], grpc.StatusCode]]:
    """Rows for the Errors-table conditions the short table above leaves out, named
    ``RPC: case`` (CSI v1.12 spec.md, per-RPC "Errors" and field rules)."""
    ctl, node, grp = h.controller, h.node, h.group
    cap, rng = mount_cap(), pb.CapacityRange
    M = pb.VolumeCapability.AccessMode
    other = h.target_path("audit-other")
    other_volume = h.create_volume("pvc-audit-src").volume_id
    h.staging_path("audit-label")
    return [
        # Identity: no error conditions; they answer whatever the state
        ("GetPluginInfo: plain", lambda: h.identity.GetPluginInfo(pb.GetPluginInfoRequest()), C.OK),
        ("GetPluginCapabilities: plain", lambda: h.identity.GetPluginCapabilities(
            pb.GetPluginCapabilitiesRequest()), C.OK),
        ("Probe: plain", lambda: h.identity.Probe(pb.ProbeRequest()), C.OK),
        ("ControllerGetCapabilities: plain", lambda: ctl.ControllerGetCapabilities(
            pb.ControllerGetCapabilitiesRequest()), C.OK),
        ("NodeGetCapabilities: plain", lambda: node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()), C.OK),
        ("NodeGetInfo: plain", lambda: node.NodeGetInfo(pb.NodeGetInfoRequest()), C.OK),
        ("GroupControllerGetCapabilities: plain", lambda: grp.GroupControllerGetCapabilities(
            pb.GroupControllerGetCapabilitiesRequest()), C.OK),
        # CreateVolume: "Volume already exists but is incompatible"; "Unsupported capacity"
        ("CreateVolume: same name, other source", lambda: ctl.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-bad", volume_capabilities=[cap], volume_content_source=pb.VolumeContentSource(
                snapshot={"snapshot_id": sid}))), C.ALREADY_EXISTS),
        ("CreateVolume: same name, block access", lambda: ctl.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-bad", volume_capabilities=[block_cap()])), C.INVALID_ARGUMENT),
        ("CreateVolume: unknown mutable parameter", lambda: ctl.CreateVolume(pb.CreateVolumeRequest(
            name="bad", volume_capabilities=[cap], mutable_parameters={"iops": "9"})), C.INVALID_ARGUMENT),
        ("CreateVolume: empty snapshot id in source", lambda: ctl.CreateVolume(pb.CreateVolumeRequest(
            name="bad", volume_capabilities=[cap], volume_content_source=pb.VolumeContentSource(
                snapshot={"snapshot_id": ""}))), C.INVALID_ARGUMENT),
        # CreateSnapshot: "Snapshot already exists but is incompatible"
        ("CreateSnapshot: same name, other source", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            name="snap-bad", source_volume_id=other_volume)), C.ALREADY_EXISTS),
        ("ListSnapshots: negative max", lambda: ctl.ListSnapshots(pb.ListSnapshotsRequest(max_entries=-1)),
         C.INVALID_ARGUMENT),
        ("ListSnapshots: unknown source is an empty list", lambda: ctl.ListSnapshots(pb.ListSnapshotsRequest(
            source_volume_id=UNKNOWN)), C.OK),
        ("GetSnapshot: no id", lambda: ctl.GetSnapshot(pb.GetSnapshotRequest()), C.INVALID_ARGUMENT),
        ("GetCapacity: unsupported capability is zero, not an error", lambda: ctl.GetCapacity(
            pb.GetCapacityRequest(volume_capabilities=[block_cap()])), C.OK),
        ("ControllerGetVolume: no id", lambda: ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest()),
         C.INVALID_ARGUMENT),
        ("ControllerGetVolume: unknown", lambda: ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=UNKNOWN)), C.NOT_FOUND),
        ("ControllerUnpublishVolume: unimplemented", lambda: ctl.ControllerUnpublishVolume(
            pb.ControllerUnpublishVolumeRequest(volume_id=vid)), C.UNIMPLEMENTED),
        # ControllerExpandVolume: "Unsupported capacity" (shrink, past free space)
        ("ControllerExpandVolume: no id", lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            capacity_range=rng(required_bytes=MiB))), C.INVALID_ARGUMENT),
        ("ControllerExpandVolume: shrink", lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=rng(limit_bytes=MiB))), C.OUT_OF_RANGE),
        # ControllerModifyVolume: not found, infeasible / unknown parameters
        ("ControllerModifyVolume: no id", lambda: ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            mutable_parameters={"compression": "zstd"})), C.INVALID_ARGUMENT),
        ("ControllerModifyVolume: unknown", lambda: ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=UNKNOWN, mutable_parameters={"compression": "zstd"})), C.NOT_FOUND),
        ("ControllerModifyVolume: no parameters", lambda: ctl.ControllerModifyVolume(
            pb.ControllerModifyVolumeRequest(volume_id=vid)), C.INVALID_ARGUMENT),
        ("ControllerModifyVolume: unknown parameter", lambda: ctl.ControllerModifyVolume(
            pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"iops": "9"})), C.INVALID_ARGUMENT),
        ("ControllerModifyVolume: infeasible on vfs", lambda: ctl.ControllerModifyVolume(
            pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters={"compression": "zstd"})),
         C.INVALID_ARGUMENT),
        # Node: access modes at publish ("volume published but is incompatible" / sharing)
        ("NodePublishVolume: single-writer publication alongside another", lambda: node.NodePublishVolume(
            pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(staging), target_path=str(other),
                                        volume_capability=mount_cap(mode=M.SINGLE_NODE_SINGLE_WRITER))),
         C.FAILED_PRECONDITION),
        ("NodePublishVolume: multi-node mode", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(other),
            volume_capability=mount_cap(mode=M.MULTI_NODE_MULTI_WRITER))), C.INVALID_ARGUMENT),
        ("NodePublishVolume: same target, other mode", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(target),
            volume_capability=mount_cap(mode=M.SINGLE_NODE_MULTI_WRITER))), C.ALREADY_EXISTS),
        ("NodeStageVolume: context= on a shared-superblock driver", lambda: node.NodeStageVolume(
            pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(h.staging_path("audit-label")),
                                      volume_capability=mount_cap(flags=('context="system_u:object_r:x:s0"',)))),
         C.INVALID_ARGUMENT),
        ("NodeUnstageVolume: no path", lambda: node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid)),
         C.INVALID_ARGUMENT),
        ("NodeGetVolumeStats: no id", lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_path=str(target))), C.INVALID_ARGUMENT),
        ("NodeExpandVolume: shrink", lambda: node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(target), capacity_range=rng(limit_bytes=MiB))), C.OUT_OF_RANGE),
        ("NodeExpandVolume: more than the controller grew", lambda: node.NodeExpandVolume(
            pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=str(target),
                                       capacity_range=rng(required_bytes=1 << 40))), C.OUT_OF_RANGE),
        # GroupController
        ("CreateVolumeGroupSnapshot: no name", lambda: grp.CreateVolumeGroupSnapshot(
            pb.CreateVolumeGroupSnapshotRequest(source_volume_ids=[vid])), C.INVALID_ARGUMENT),
        ("CreateVolumeGroupSnapshot: unknown source", lambda: grp.CreateVolumeGroupSnapshot(
            pb.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[vid, UNKNOWN])), C.NOT_FOUND),
        ("DeleteVolumeGroupSnapshot: no id", lambda: grp.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(snapshot_ids=[sid])), C.INVALID_ARGUMENT),
        ("DeleteVolumeGroupSnapshot: unknown is done", lambda: grp.DeleteVolumeGroupSnapshot(
            pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=TRAVERSAL, snapshot_ids=[sid])), C.OK),
        ("GetVolumeGroupSnapshot: unknown", lambda: grp.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id="grp-0123456789abcdef0123456789abcdef@" + NODE, snapshot_ids=[sid])), C.NOT_FOUND),
    ]


def aborted_rows(h: Harness, vid: str, sid: str, staging: Path,
                 target: Path) -> list[tuple[str, str, Callable[[], Any]]]:
    """"Operation pending for volume/snapshot" -> ABORTED: (case, key another call holds, call)."""
    ctl, node, grp = h.controller, h.node, h.group
    layer, slayer = vid.split("@")[0], sid.split("@")[0]
    fresh = h.target_path("aborted")
    return [
        ("CreateVolume: same name in flight", "volume-name:pvc-race", lambda: ctl.CreateVolume(
            pb.CreateVolumeRequest(name="pvc-race", volume_capabilities=[mount_cap()]))),
        ("DeleteVolume: same volume in flight", f"volume:{layer}", lambda: ctl.DeleteVolume(
            pb.DeleteVolumeRequest(volume_id=vid))),
        ("CreateSnapshot: same name in flight", "snapshot-name:snap-race", lambda: ctl.CreateSnapshot(
            pb.CreateSnapshotRequest(name="snap-race", source_volume_id=vid))),
        ("DeleteSnapshot: same snapshot in flight", f"snapshot:{slayer}", lambda: ctl.DeleteSnapshot(
            pb.DeleteSnapshotRequest(snapshot_id=sid))),
        ("ControllerExpandVolume: same volume in flight", f"volume:{layer}", lambda: ctl.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=pb.CapacityRange(
                required_bytes=128 * MiB)))),
        ("NodePublishVolume: same volume in flight", f"volume:{layer}", lambda: node.NodePublishVolume(
            pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(staging), target_path=str(fresh),
                                        volume_capability=mount_cap(), readonly=True))),
        ("NodeUnpublishVolume: same target in flight", f"path:{target}", lambda: node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))),
        ("CreateVolumeGroupSnapshot: a member in flight", f"source:{vid}", lambda: grp.CreateVolumeGroupSnapshot(
            pb.CreateVolumeGroupSnapshotRequest(name="g-race", source_volume_ids=[vid]))),
    ]


def test_bad_requests_change_nothing(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vol = h.create_volume("pvc-bad", size=64 * MiB)
    staging, target = h.mounted(vol.volume_id, "bad")
    (target / "data").write_bytes(b"keep me")
    snap = h.snapshot("snap-bad", vol.volume_id)
    table = bad_requests(h, vol.volume_id, snap.snapshot_id, staging, target)
    aborted = aborted_rows(h, vol.volume_id, snap.snapshot_id, staging, target)
    before = h.disk_state()
    failures = []
    for what, call, expected in table:
        got = code_of(call)
        if got != expected:
            failures.append(f"{what}: got {got.name}, want {expected.name}")
        after = h.disk_state()
        if after != before:
            failures.append(f"{what}: changed the disk or the records")
            before = after
    assert h.handle is not None
    for what, key, call in aborted:
        with h.handle.plugin.locks.hold(key):
            got = code_of(call)
        if got != C.ABORTED:
            failures.append(f"{what}: got {got.name}, want ABORTED")
        if (after := h.disk_state()) != before:
            changed = sorted(k for k in set(after["tree"]) ^ set(before["tree"]))
            failures.append(f"{what}: changed the disk or the records {changed}")
            before = after
    assert failures == []
    assert (target / "data").read_bytes() == b"keep me"
    # every RPC strata serves has rows in the audit
    covered = {rpc_of(what) for what, _, _ in table}
    served = set()
    for service in ("Identity", "Controller", "Node", "GroupController"):
        for name in pb.DESCRIPTOR.services_by_name[service].methods_by_name:
            served.add(name)
    assert served - covered == set(), f"RPCs without audit rows: {sorted(served - covered)}"
