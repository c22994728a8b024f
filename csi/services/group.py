"""CSI GroupController service: volume group snapshots, crash-consistent across members.

``CreateVolumeGroupSnapshot`` freezes every member volume into a snapshot layer
(``driver.freeze``) at one instant with respect to the writers: the spec asks for
write-order consistency ("all the volume snapshots in the group MUST be taken at the same
point-in-time relative to a stream of write traffic") or failure. How the writers are held
depends on where the snapshot happens:

* a driver that sets ``Driver.snapshot_below_filesystem`` (each volume its own filesystem on
  its own device, the snapshot taken beneath it): every staged member's filesystem is frozen
  with FIFREEZE (:func:`csi.host.freeze.frozen`) — synced, writers blocked in the kernel — for
  the moment the snapshots take, then thawed. devicemapper would be one, but its thin
  snapshot suspends the device, which freezes the filesystem again: EBUSY on 6.1 while it is
  FIFREEZE-frozen, so it leaves the flag off (and is held as below) until its suspend skips
  lockfs (DM_SKIP_LOCKFS_FLAG). The kernel lane checks devicemapper group snapshots.
* **btrfs** (a subvolume per volume, one filesystem for all) and **overlay** (an overlay
  mount per volume over directories of one filesystem) and **vfs** (a directory per volume):
  the snapshot is itself filesystem work (btrfs's snapshot ioctl commits a transaction;
  overlay copies the upper dir's changes; vfs copies), which FIFREEZE on that filesystem
  would block — so the *writers* are held instead (:func:`csi.host.freeze.held_writers`):
  every process with a file open for writing on a member is stopped (SIGSTOP, confirmed for
  every thread), the members are frozen one after the other, and the processes continue.
  A ``write(2)`` in progress completes before the stop, so each write is either in every
  member snapshot's past or in none's future. Writers are found by the member's device
  where it has one (a btrfs subvolume and an overlay mount each have their own ``st_dev``);
  a vfs volume shares the device of its filesystem, so its writers are found by the host
  paths of its staging and publications, and any process in another mount namespace (a
  container) writing to that filesystem is held too — the "freeze that filesystem once"
  of vfs, for the time its copies take.

Unstaged members have no writers and need no hold. Block volumes cannot join a group
(FAILED_PRECONDITION: "cannot snapshot multiple volumes together").

Records (:mod:`csi.state.store`): the group is written ``pending`` with the member snapshot
layers it is about to make; when all are frozen, the member snapshot rows and the group's
``ready`` are one transaction. A failure on any member removes the ones already made and
the row (no member left behind); after ``kill -9`` start-up recovery does the same from the
``pending`` row. Deletion marks the group and its members ``removing`` first.

IDs: the group's is ``grp-<32 hex>@<node>``; members are ordinary snapshots (usable as a
volume content source, listed by ListSnapshots with their ``group_snapshot_id``), which
DeleteSnapshot refuses individually (FAILED_PRECONDITION naming the group: a group is
deleted whole). ``snapshot_ids`` given to Delete/Get must be the group's members exactly
(INVALID_ARGUMENT otherwise, the spec's "snapshot list mismatch").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import grpc

from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.host import freeze as fz
from csi.ids import new_layer_id
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.plugin import PluginService, timestamp
from csi.services.recovery import roll_back_group
from csi.services.requests import check_snapshot_parameters, require
from csi.services.volume_ids import GROUP_PREFIX, SNAPSHOT_PREFIX, VOLUME_PREFIX, parse_local
from csi.state.store import STAGE, GroupRecord, RecordState, SnapshotRecord, VolumeRecord

log = logging.getLogger("strata.group")
_Cap = csi_pb2.GroupControllerServiceCapability.RPC
CAPABILITIES = (_Cap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT,)



class GroupControllerService(PluginService, csi_pb2_grpc.GroupControllerServicer):
    # ------------------------------------------------------------------ helpers

    def _message(self, group: GroupRecord) -> csi_pb2.VolumeGroupSnapshot:
        gid = self._vid(group.group_id)
        snapshots = []
        for layer in group.members:
            s = self.store.snapshot(layer)
            if s is None:
                continue
            snapshots.append(csi_pb2.Snapshot(snapshot_id=self._vid(s.layer), source_volume_id=self._vid(s.source_layer),
                                              size_bytes=s.size, creation_time=timestamp(s.created),
                                              ready_to_use=True, group_snapshot_id=gid))
        return csi_pb2.VolumeGroupSnapshot(group_snapshot_id=gid, snapshots=snapshots,
                                           creation_time=timestamp(group.created), ready_to_use=True)

    def _members(self, source_volume_ids: Sequence[str]) -> list[VolumeRecord]:
        if len(set(source_volume_ids)) != len(source_volume_ids):
            raise InvalidArgument("source_volume_ids names a volume more than once")
        records = []
        for vid in source_volume_ids:
            require(vid, "every source_volume_ids entry")
            layer = parse_local(vid, self.plugin.node_id, VOLUME_PREFIX)
            record = self.store.volume(layer)
            if record is None or record.state is not RecordState.READY or record.ephemeral:
                raise NotFound(f"volume {vid} does not exist")
            records.append(record)
        return records

    def _group(self, group_snapshot_id: str) -> GroupRecord | None:
        try:
            gid = parse_local(group_snapshot_id, self.plugin.node_id, GROUP_PREFIX)
        except NotFound:
            return None
        return self.store.group(gid)

    def _check_members(self, group: GroupRecord, snapshot_ids: Sequence[str]) -> None:
        given = set(snapshot_ids)
        wanted = {self._vid(layer) for layer in group.members}
        if given != wanted:
            raise InvalidArgument(f"snapshot_ids do not match the {len(wanted)} member snapshot(s) of group snapshot "
                                  f"{self._vid(group.group_id)}")

    @contextmanager
    def _consistent(self, members: Sequence[VolumeRecord]) -> Iterator[None]:
        """Hold the members' writers for the block (see the module docstring)."""
        staged = [p for p in self.store.publications() if p.kind == STAGE and
                  p.state is RecordState.READY and p.layer in {m.layer for m in members}]
        if not staged:
            yield
            return
        if self.driver.snapshot_below_filesystem:
            with fz.frozen([p.path for p in staged]):
                yield
            return
        shared_dev = os.stat(self.plugin.root).st_dev
        devices: set[int] = set()
        paths: list[str] = []
        layers = {p.layer for p in staged}
        for pub in self.store.publications():
            if pub.layer not in layers or pub.state is not RecordState.READY:
                continue
            dev = os.stat(pub.path).st_dev
            if dev != shared_dev:
                devices.add(dev)  # a btrfs subvolume, an overlay mount: its own device
            else:
                paths.append(pub.path)  # a directory of the shared filesystem (vfs): by path
        shared = {shared_dev} if paths else set()
        with fz.held_writers(devices, paths, shared) as held:
            log.info("group snapshot: %d writer process(es) held", len(held))
            yield

    # ------------------------------------------------------------------ RPCs

    def GroupControllerGetCapabilities(self, request: csi_pb2.GroupControllerGetCapabilitiesRequest,
                                       context: grpc.ServicerContext) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.GroupControllerServiceCapability(rpc={"type": c}) for c in CAPABILITIES])

    def CreateVolumeGroupSnapshot(self, request: csi_pb2.CreateVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        require(request.name, "name")
        require(request.source_volume_ids, "source_volume_ids")
        sources = list(request.source_volume_ids)
        keys = [f"group-name:{request.name}", *(f"source:{vid}" for vid in sources)]
        with self.plugin.locks.hold(*keys):
            existing = self.store.group_by_name(request.name)
            if existing is not None:
                if existing.state is not RecordState.READY or \
                        sorted(self._vid(s) for s in existing.sources) != sorted(sources):
                    raise AlreadyExists(f"group snapshot {request.name!r} exists for other source volumes")
                return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._message(existing))
            members = self._members(sources)
            check_snapshot_parameters(request.parameters)
            blocks = [self._vid(m.layer) for m in members if m.block]
            if blocks:
                raise FailedPrecondition(f"block volume(s) {', '.join(blocks)} cannot be snapshotted in a group: "
                                         "strata groups filesystem volumes")
            group = self.store.add_group(GroupRecord(
                group_id=new_layer_id(GROUP_PREFIX), name=request.name,
                members=tuple(new_layer_id(SNAPSHOT_PREFIX) for _ in members),
                sources=tuple(m.layer for m in members)))
            try:
                with ExitStack() as stack:
                    stack.enter_context(self._consistent(members))
                    for member, snap in zip(members, group.members):
                        self.driver.freeze(member.layer, snap)
                with self.store.transaction():
                    for member, snap in zip(members, group.members):
                        self.store.add_snapshot(SnapshotRecord(
                            layer=snap, name=f"{request.name}/{member.layer}", source_layer=member.layer,
                            size=member.capacity, created=group.created, state=RecordState.READY,
                            group_id=group.group_id))
                    self.store.set_group(group.group_id, RecordState.READY)
            except BaseException:
                log.warning("group snapshot %s failed; removing the members made so far", request.name)
                roll_back_group(self.store, self.driver, group)
                raise
            ready = self.store.group(group.group_id)
            assert ready is not None
            return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._message(ready))

    def DeleteVolumeGroupSnapshot(self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        require(request.group_snapshot_id, "group_snapshot_id")
        require(request.snapshot_ids, "snapshot_ids")
        with self.plugin.locks.hold(f"group:{request.group_snapshot_id}"):
            group = self._group(request.group_snapshot_id)
            if group is None:
                return csi_pb2.DeleteVolumeGroupSnapshotResponse()
            self._check_members(group, request.snapshot_ids)
            with self.store.transaction():
                self.store.set_group(group.group_id, RecordState.REMOVING)
                for layer in group.members:
                    self.store.set_snapshot(layer, state=RecordState.REMOVING)
            roll_back_group(self.store, self.driver, group)  # hidden while restored volumes use a member
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(self, request: csi_pb2.GetVolumeGroupSnapshotRequest,
                               context: grpc.ServicerContext) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        require(request.group_snapshot_id, "group_snapshot_id")
        require(request.snapshot_ids, "snapshot_ids")
        group = self._group(request.group_snapshot_id)
        if group is None or group.state is not RecordState.READY:
            raise NotFound(f"group snapshot {request.group_snapshot_id} does not exist")
        self._check_members(group, request.snapshot_ids)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self._message(group))


__all__ = ["GroupControllerService"]
