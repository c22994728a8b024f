"""The four defect classes an independent CSI v1.12 conformance run found, each as a class
of cases (not the one case), over the real socket on vfs, overlay and btrfs:

1. access modes enforced at publish (every mode x every second publication, read-only
   publications, MULTI_NODE_* refused) and no delete-after-publish cascade;
2. one order of checks for every RPC: required fields -> the object exists -> its state ->
   the finer shape of the other arguments (an unknown volume with a malformed path is
   NOT_FOUND);
3. paging tokens are opaque and checked: anything strata did not issue is ABORTED;
4. capabilities advertised == RPCs served, both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from csi_harness import NODE, Harness, MiB, code_of, mount_cap

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc

C = grpc.StatusCode
M = pb.VolumeCapability.AccessMode
UNKNOWN = "vol-0123456789abcdef0123456789abcdef@" + NODE
UNKNOWN_SNAP = "snap-0123456789abcdef0123456789abcdef@" + NODE
SINGLE_MODES = (M.SINGLE_NODE_WRITER, M.SINGLE_NODE_READER_ONLY, M.SINGLE_NODE_SINGLE_WRITER,
                M.SINGLE_NODE_MULTI_WRITER)
MULTI_MODES = (M.MULTI_NODE_READER_ONLY, M.MULTI_NODE_SINGLE_WRITER, M.MULTI_NODE_MULTI_WRITER)
DRIVERS = ("vfs", "overlay", "btrfs")


def writable(directory: Path) -> bool:
    try:
        (directory / ".probe").write_bytes(b"x")
    except OSError:
        return False
    (directory / ".probe").unlink()
    return True


def second_publish_allowed(first: tuple[int, bool], second: tuple[int, bool]) -> bool:
    """The spec's access modes (csi.proto AccessMode comments) for two publications of one
    volume on this node, each (mode, read-only). Reader-only modes publish read-only."""
    (mode1, ro1), (mode2, ro2) = first, second
    ro1 = ro1 or mode1 == M.SINGLE_NODE_READER_ONLY
    ro2 = ro2 or mode2 == M.SINGLE_NODE_READER_ONLY
    if M.SINGLE_NODE_SINGLE_WRITER in (mode1, mode2):
        return False  # "published once as read/write ... at any given time" and RWOP: one workload
    if mode1 == M.SINGLE_NODE_WRITER or mode2 == M.SINGLE_NODE_WRITER:
        return ro1 or ro2  # at most one read/write publication
    return True  # SINGLE_NODE_MULTI_WRITER and reader-only modes share


@pytest.mark.parametrize("driver", DRIVERS)
def test_access_modes_at_publish(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    failures = []
    cases = [((m1, ro1), (m2, ro2)) for m1 in SINGLE_MODES for ro1 in (False, True)
             for m2 in SINGLE_MODES for ro2 in (False, True)]
    if driver != "vfs":
        cases = cases[::5]  # the full matrix on vfs; a spread of it on the others (time)
    for i, (first, second) in enumerate(cases):
        vol = h.create_volume(f"pvc-am-{i}").volume_id
        staging = h.staging_path(f"am-{i}")
        h.stage(vol, staging, mount_cap(mode=first[0]))
        t1, t2 = h.target_path(f"am-{i}-a"), h.target_path(f"am-{i}-b")
        h.publish(vol, staging, t1, readonly=first[1], cap=mount_cap(mode=first[0]))
        before = h.disk_state()
        got = code_of(lambda: h.publish(vol, staging, t2, readonly=second[1], cap=mount_cap(mode=second[0])))
        want = C.OK if second_publish_allowed(first, second) else C.FAILED_PRECONDITION
        name = f"{M.Mode.Name(first[0])}{'/ro' if first[1] else ''} then {M.Mode.Name(second[0])}" \
               f"{'/ro' if second[1] else ''}"
        if got != want:
            failures.append(f"{name}: got {got.name}, want {want.name}")
        if want != C.OK and h.disk_state() != before:
            failures.append(f"{name}: a refused publish changed the disk")
        # a read-only publication really is read-only
        for target, (mode, ro) in ((t1, first), (t2, second)):
            if target.is_dir() and (ro or mode == M.SINGLE_NODE_READER_ONLY) and writable(target):
                failures.append(f"{name}: read-only publication at {target} is writable")
        # tear down in the order kubelet does; nothing cascades into the delete
        for target in (t2, t1):
            h.unpublish(vol, target)
        h.unstage(vol, staging)
        got = code_of(lambda: h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol)))
        if got != C.OK:
            failures.append(f"{name}: delete after unpublish/unstage: {got.name}")
    assert failures == []


def test_multi_node_modes_refused_everywhere(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vol = h.create_volume("pvc-mn").volume_id
    staging, target = h.staging_path("mn"), h.target_path("mn")
    h.stage(vol, staging)
    for mode in MULTI_MODES:
        cap = mount_cap(mode=mode)
        assert code_of(lambda: h.controller.CreateVolume(pb.CreateVolumeRequest(
            name="mn", volume_capabilities=[cap]))) == C.INVALID_ARGUMENT
        assert code_of(lambda: h.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol, staging_target_path=str(h.staging_path("mn2")), volume_capability=cap))) \
            == C.INVALID_ARGUMENT
        assert code_of(lambda: h.publish(vol, staging, target, cap=cap)) == C.INVALID_ARGUMENT
        v = h.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol, volume_capabilities=[cap]))
        assert not v.HasField("confirmed") and "node-local" in v.message


def test_delete_in_use_names_the_use(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vol = h.create_volume("pvc-inuse").volume_id
    staging, target = h.mounted(vol, "inuse")
    with pytest.raises(grpc.RpcError) as err:
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol))
    assert err.value.code() == C.FAILED_PRECONDITION
    assert "published at" in err.value.details() and "publishd" not in err.value.details()
    h.unpublish(vol, target)
    with pytest.raises(grpc.RpcError) as err:
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol))
    assert "staged at" in err.value.details()
    h.unstage(vol, staging)
    h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol))


# ---------------------------------------------------------------------- 2. order of checks


def order_cases(h: Harness) -> list[tuple[str, Callable[[], Any], grpc.StatusCode]]:
    """Every RPC that takes an object ID: the object does not exist AND another argument
    is malformed -> the spec's code for the missing object (checked before the shape)."""
    ctl, node = h.controller, h.node
    bad_cap = mount_cap(flags=("sync",))  # a flag strata refuses
    rel = "relative/path"
    rng = pb.CapacityRange
    return [
        ("NodeGetVolumeStats", lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=UNKNOWN, volume_path=rel)), C.NOT_FOUND),
        ("NodeGetVolumeStats foreign id", lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id="some-vol-id", volume_path="some/path")), C.NOT_FOUND),
        ("NodeExpandVolume", lambda: node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=UNKNOWN, volume_path=rel, capacity_range=rng(required_bytes=MiB))), C.NOT_FOUND),
        ("NodeExpandVolume foreign id", lambda: node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id="some-vol-id", volume_path="some/path")), C.NOT_FOUND),
        ("NodeStageVolume", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=UNKNOWN, staging_target_path=rel, volume_capability=bad_cap)), C.NOT_FOUND),
        ("NodeUnstageVolume", lambda: node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=UNKNOWN, staging_target_path=rel)), C.NOT_FOUND),
        ("NodePublishVolume", lambda: node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=UNKNOWN, staging_target_path=rel, target_path=rel + "2", volume_capability=bad_cap)),
         C.NOT_FOUND),
        ("NodeUnpublishVolume", lambda: node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=UNKNOWN, target_path=rel)), C.NOT_FOUND),
        ("ValidateVolumeCapabilities", lambda: ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=UNKNOWN, volume_capabilities=[bad_cap])), C.NOT_FOUND),
        ("ControllerExpandVolume", lambda: ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=UNKNOWN, capacity_range=rng(required_bytes=-5), volume_capability=bad_cap)), C.NOT_FOUND),
        ("ControllerGetVolume", lambda: ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=UNKNOWN)), C.NOT_FOUND),
        ("CreateSnapshot", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            name="snap-order", source_volume_id=UNKNOWN, parameters={"bogus": "x"})), C.NOT_FOUND),
        ("CreateVolume from unknown snapshot", lambda: ctl.CreateVolume(pb.CreateVolumeRequest(
            name="order", volume_capabilities=[mount_cap()], parameters={"bogus": "x"},
            volume_content_source=pb.VolumeContentSource(snapshot={"snapshot_id": UNKNOWN_SNAP}))), C.NOT_FOUND),
        ("ControllerModifyVolume", lambda: ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=UNKNOWN, mutable_parameters={"bogus": "x"})), C.NOT_FOUND),
        # required fields come first of all
        ("NodeGetVolumeStats no path", lambda: node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=UNKNOWN)), C.INVALID_ARGUMENT),
        ("NodeExpandVolume no id", lambda: node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_path=rel)), C.INVALID_ARGUMENT),
        ("NodeStageVolume no capability", lambda: node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=UNKNOWN, staging_target_path=rel)), C.INVALID_ARGUMENT),
        ("CreateSnapshot no name", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            source_volume_id=UNKNOWN)), C.INVALID_ARGUMENT),
    ]


def test_order_of_checks(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    before = h.disk_state()
    failures = [f"{what}: got {got.name}, want {want.name}" for what, call, want in order_cases(h)
                if (got := code_of(call)) != want]
    assert failures == []
    assert h.disk_state() == before


def test_state_before_shape(vfs_plugin: Harness) -> None:
    """An existing volume not used at a path: NOT_FOUND for the path (the volume's state),
    and only then is a malformed path a shape error."""
    h = vfs_plugin
    vol = h.create_volume("pvc-state").volume_id
    assert code_of(lambda: h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=vol, volume_path="relative"))) == C.INVALID_ARGUMENT
    assert code_of(lambda: h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=vol, volume_path=str(h.base / "nowhere")))) == C.NOT_FOUND


# ---------------------------------------------------------------------- 3. paging tokens


def test_paging_tokens_are_opaque(vfs_plugin: Harness) -> None:
    h = vfs_plugin
    vols = [h.create_volume(f"pvc-tok-{i}").volume_id for i in range(3)]
    snaps = [h.snapshot(f"snap-tok-{i}", vols[0]).snapshot_id for i in range(3)]
    vpage = h.controller.ListVolumes(pb.ListVolumesRequest(max_entries=1))
    spage = h.controller.ListSnapshots(pb.ListSnapshotsRequest(max_entries=1))
    assert vpage.next_token and spage.next_token
    layer = vols[1].split("@")[0]
    forged = ["invalid-token", layer, vols[1], snaps[1].split("@")[0], "0", "x" * 5000,
              vpage.next_token[:-2] + ("AA" if not vpage.next_token.endswith("AA") else "BB"),
              spage.next_token]  # a ListSnapshots token is no ListVolumes token
    for token in forged:
        assert code_of(lambda: h.controller.ListVolumes(pb.ListVolumesRequest(starting_token=token))) \
            == C.ABORTED, token
    sforged = ["invalid-token", snaps[1].split("@")[0], snaps[1], vpage.next_token,
               spage.next_token[::-1]]
    for token in sforged:
        assert code_of(lambda: h.controller.ListSnapshots(pb.ListSnapshotsRequest(starting_token=token))) \
            == C.ABORTED, token
    # issued tokens work, and page through everything exactly once
    seen, token = [], ""
    while True:
        page = h.controller.ListVolumes(pb.ListVolumesRequest(max_entries=1, starting_token=token))
        seen += [e.volume.volume_id for e in page.entries]
        if not (token := page.next_token):
            break
    assert sorted(seen) == sorted(vols)


# ---------------------------------------------------------------------- 4. capabilities == RPCs

CR = pb.ControllerServiceCapability.RPC
NR = pb.NodeServiceCapability.RPC
GR = pb.GroupControllerServiceCapability.RPC
S = pb.PluginCapability.Service

# each capability with the RPCs it says are served (empty: a mode or a field, checked by
# an RPC call that succeeds only when the ability is there)
CONTROLLER_RPCS = {
    CR.CREATE_DELETE_VOLUME: ("CreateVolume", "DeleteVolume"),
    CR.PUBLISH_UNPUBLISH_VOLUME: ("ControllerPublishVolume", "ControllerUnpublishVolume"),
    CR.LIST_VOLUMES: ("ListVolumes",),
    CR.GET_CAPACITY: ("GetCapacity",),
    CR.CREATE_DELETE_SNAPSHOT: ("CreateSnapshot", "DeleteSnapshot"),
    CR.LIST_SNAPSHOTS: ("ListSnapshots",),
    CR.EXPAND_VOLUME: ("ControllerExpandVolume",),
    CR.GET_VOLUME: ("ControllerGetVolume",),
    CR.MODIFY_VOLUME: ("ControllerModifyVolume",),
    CR.GET_SNAPSHOT: ("GetSnapshot",),
}
NODE_RPCS = {
    NR.STAGE_UNSTAGE_VOLUME: ("NodeStageVolume", "NodeUnstageVolume"),
    NR.GET_VOLUME_STATS: ("NodeGetVolumeStats",),
    NR.EXPAND_VOLUME: ("NodeExpandVolume",),
}
GROUP_RPCS = {GR.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT: ("CreateVolumeGroupSnapshot", "DeleteVolumeGroupSnapshot",
                                                          "GetVolumeGroupSnapshot")}
ALWAYS = {"Controller": {"ControllerGetCapabilities", "ValidateVolumeCapabilities"},
          "Node": {"NodeGetCapabilities", "NodeGetInfo", "NodePublishVolume", "NodeUnpublishVolume"}, "GroupController": {"GroupControllerGetCapabilities"},
          "Identity": {"GetPluginInfo", "GetPluginCapabilities", "Probe"}}


def served(h: Harness, service: str) -> set[str]:
    """The RPCs of a service that the server implements: an empty request answers anything
    but UNIMPLEMENTED."""
    stub = getattr(rpc, f"{service}Stub")(h.stubs.channel)
    names = pb.DESCRIPTOR.services_by_name[service].methods_by_name
    out = set()
    for name, method in names.items():
        request = getattr(pb, method.input_type.name)()
        if code_of(lambda: getattr(stub, name)(request, timeout=10)) != C.UNIMPLEMENTED:
            out.add(name)
    return out


@pytest.mark.parametrize("driver", DRIVERS)
def test_capabilities_match_rpcs(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    plugin_caps = h.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in plugin_caps if c.HasField("service")}
    ctl_caps = {c.rpc.type for c in h.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    node_caps = {c.rpc.type for c in h.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities}
    group_stub = rpc.GroupControllerStub(h.stubs.channel)
    group_caps = set()
    if S.GROUP_CONTROLLER_SERVICE in services:
        group_caps = {c.rpc.type for c in group_stub.GroupControllerGetCapabilities(
            pb.GroupControllerGetCapabilitiesRequest()).capabilities}
    failures = []
    for service, caps, table, advertised_service in (
            ("Controller", ctl_caps, CONTROLLER_RPCS, S.CONTROLLER_SERVICE in services),
            ("Node", node_caps, NODE_RPCS, True),
            ("GroupController", group_caps, GROUP_RPCS, S.GROUP_CONTROLLER_SERVICE in services)):
        rpcs = served(h, service)
        if not advertised_service:
            if rpcs:
                failures.append(f"{service} serves {sorted(rpcs)} but the plugin does not advertise the service")
            continue
        expected = set(ALWAYS[service])
        for cap, names in table.items():
            if cap in caps:
                expected |= set(names)
        if rpcs != expected:
            failures.append(f"{service}: served {sorted(rpcs)} but the capabilities say {sorted(expected)}")
    assert served(h, "Identity") == ALWAYS["Identity"]
    # the abilities that are modes or fields, checked by use
    vol = h.create_volume("pvc-caps").volume_id
    clone = code_of(lambda: h.create_volume("pvc-caps-clone", source=pb.VolumeContentSource(
        volume={"volume_id": vol})))
    if (CR.CLONE_VOLUME in ctl_caps) != (clone == C.OK):
        failures.append(f"CLONE_VOLUME advertised={CR.CLONE_VOLUME in ctl_caps} but a clone answered {clone.name}")
    multi = code_of(lambda: h.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-caps-mw", volume_capabilities=[mount_cap(mode=M.SINGLE_NODE_MULTI_WRITER)])))
    for caps, cap in ((ctl_caps, CR.SINGLE_NODE_MULTI_WRITER), (node_caps, NR.SINGLE_NODE_MULTI_WRITER)):
        if (cap in caps) != (multi == C.OK):
            failures.append(f"SINGLE_NODE_MULTI_WRITER advertised={cap in caps} but the mode answered {multi.name}")
    got = h.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol))
    if (CR.VOLUME_CONDITION in ctl_caps) != got.status.HasField("volume_condition"):
        failures.append("controller VOLUME_CONDITION does not match ControllerGetVolume's answer")
    if CR.LIST_VOLUMES_PUBLISHED_NODES in ctl_caps or CR.PUBLISH_READONLY in ctl_caps:
        failures.append("a controller publish capability is advertised without ControllerPublishVolume")
    staging, target = h.mounted(vol, "caps")
    stats = h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol, volume_path=str(target)))
    if (NR.VOLUME_CONDITION in node_caps) != stats.HasField("volume_condition"):
        failures.append("node VOLUME_CONDITION does not match NodeGetVolumeStats's answer")
    group = code_of(lambda: h.stage(vol, h.staging_path("caps-g"), mount_cap(group="1234")))
    if (NR.VOLUME_MOUNT_GROUP in node_caps) != (group == C.OK):
        failures.append(f"VOLUME_MOUNT_GROUP advertised={NR.VOLUME_MOUNT_GROUP in node_caps} but staging "
                        f"with a group answered {group.name}")
    assert failures == []
