"""CSI Controller service: volumes and snapshots as layers.

==========================  ================================================================
CreateVolume (empty)        ``driver.create(vol, None, size)``
CreateVolume from snapshot  ``driver.create(vol, parent=snapshot layer)`` — restore
CreateVolume from volume    ``driver.freeze(source, base)``, ``driver.create(vol, parent=base)``,
                            ``driver.remove(base)`` (hidden until the clone goes) — clone
CreateVolume from another   the source's missing layers pulled (another node's snapshot or
node or from a backup       volume, an ``oci://…@sha256:…`` / ``oci-layout:…`` backup) and
                            imported as frozen ``oci-<ChainID>`` layers, then
                            ``driver.create(vol, parent=top)``: :mod:`csi.services.sources`
                            (a pull that outlasts the call goes on in the background; the
                            repeated call is ABORTED until it is done)
CreateSnapshot              ``driver.freeze(volume, snap)``; with a ``backupTarget``
                            parameter also an upload in the background (``ready_to_use``
                            false until it is done; the record keeps the reference)
Delete*                     ``driver.remove`` (deferred by the driver while children exist);
                            DeleteSnapshot also removes the backup's tag
ControllerExpandVolume      ``driver.resize``; where the driver cannot enforce sizes
                            (``Unsupported``) the new capacity is recorded only. Infeasible
                            (OUT_OF_RANGE, nothing changed, so Kubernetes can recover):
                            a ``limit_bytes`` below the current capacity (shrinking), or
                            growth beyond the backing store's free space or size
ControllerModifyVolume      ``driver.modify(layer, mutable_parameters)`` — what the driver can
                            change on a live volume (``Driver.mutable_properties``: btrfs
                            ``compression``); INVALID_ARGUMENT naming the driver otherwise.
                            CreateVolume takes the same keys as StorageClass parameters or
                            ``mutable_parameters`` (VolumeAttributesClass)
==========================  ================================================================

Block volumes (volumeMode Block, where the driver ``supports_block``) are raw block layers
(``CreateOpts(block=True)``); the record keeps the access type. A restore or clone keeps
its source's type: asking for the other one is INVALID_ARGUMENT, and so is the same name
again with the other type (ALREADY_EXISTS, as any incompatible repeat).

Crash protocol: creates do the layer work first, under fresh random layer IDs with
strata's prefixes, and then commit the record, ``ready``, in one transaction: a kill
before the commit leaves only layers no record knows of, which start-up recovery removes
(nothing was acknowledged). Deletes mark the record ``removing`` first (forget first),
remove the layer, then drop the record; recovery finishes ``removing`` records.
Idempotency: a name (or ID) is locked for the call (:class:`KeyLocks`, racing calls get
ABORTED); a repeat with compatible arguments returns the existing object.

Contract: requests are validated by :mod:`csi.services.requests` before anything changes;
the driver is reached only through :class:`csi.graphdriver.driver.Driver`; errors leave
as :mod:`csi.errors` types for the seam (:mod:`csi.services.status`) to answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from contextlib import closing
from datetime import datetime, timezone
from typing import TypeVar

import grpc

from csi.backup import read_artifact
from csi.backup.media import ANNOTATION_CREATED
from csi.backup.targets import open_target
from csi.errors import (Aborted, AlreadyExists, Busy, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
                        StrataError, Unsupported)
from csi.graphdriver.driver import CreateOpts
from csi.ids import new_layer_id
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.plugin import PluginService, timestamp
from csi.services.requests import (MUTABLE_PARAMETERS, check_snapshot_parameters, docker_config_of, fits,
                                   is_backup_reference, issue_token, read_token, requested_size, require)
from csi.services.sources import LOCAL, Pulled, Source, classify
from csi.services.volume_ids import CLONE_BASE_PREFIX, SNAPSHOT_PREFIX, VOLUME_PREFIX, parse_id, parse_local
from csi.state.store import BACKUP_FAILED, BACKUP_UPLOADING, RecordState, SnapshotRecord, VolumeRecord

log = logging.getLogger("strata.controller")
Record = TypeVar("Record", VolumeRecord, SnapshotRecord)
_Cap = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (_Cap.CREATE_DELETE_VOLUME, _Cap.CREATE_DELETE_SNAPSHOT, _Cap.CLONE_VOLUME, _Cap.LIST_VOLUMES,
                _Cap.LIST_SNAPSHOTS, _Cap.GET_CAPACITY, _Cap.EXPAND_VOLUME, _Cap.GET_VOLUME,
                _Cap.VOLUME_CONDITION, _Cap.SINGLE_NODE_MULTI_WRITER, _Cap.GET_SNAPSHOT, _Cap.MODIFY_VOLUME)
_USE_WORDS = {"stage": "staged", "publish": "published"}
# volume_context keys of a volume made from a source elsewhere (shown in the PersistentVolume)
CONTEXT_RESTORED_FROM = "strata.csi.dev/restored-from"
CONTEXT_NOTE = "strata.csi.dev/restore-note"


def _access(block: bool) -> str:
    return "block" if block else "mount"



class ControllerService(PluginService, csi_pb2_grpc.ControllerServicer):
    # ------------------------------------------------------------------ helpers

    def _volume(self, volume_id: str) -> VolumeRecord:
        layer = parse_local(volume_id, self.plugin.node_id, VOLUME_PREFIX)
        record = self.store.volume(layer)
        if record is None or record.state is not RecordState.READY or record.ephemeral:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    def _snapshot(self, snapshot_id: str) -> SnapshotRecord:
        layer = parse_local(snapshot_id, self.plugin.node_id, SNAPSHOT_PREFIX)
        record = self.store.snapshot(layer)
        if record is None or record.state is not RecordState.READY:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return record

    def _volume_message(self, v: VolumeRecord, context: dict[str, str] | None = None) -> csi_pb2.Volume:
        volume = csi_pb2.Volume(volume_context=context or {})
        self._fill_volume(volume, v, csi_pb2.Topology(segments=self.plugin.topology()))
        return volume

    def _fill_volume(self, volume: csi_pb2.Volume, v: VolumeRecord, topology: csi_pb2.Topology) -> None:
        """Set ``volume``'s fields from the record, in place (a page of ListVolumes fills the
        entries of its response: building and copying a message per entry was most of a page)."""
        volume.volume_id = self._vid(v.layer)
        volume.capacity_bytes = v.capacity
        if v.source_kind == "snapshot":
            volume.content_source.snapshot.snapshot_id = v.source_id
        elif v.source_kind == "volume":
            volume.content_source.volume.volume_id = v.source_id
        volume.accessible_topology.append(topology)

    def _snapshot_message(self, s: SnapshotRecord) -> csi_pb2.Snapshot:
        return csi_pb2.Snapshot(snapshot_id=self._vid(s.layer), source_volume_id=self._vid(s.source_layer),
                                size_bytes=s.size, creation_time=timestamp(s.created), ready_to_use=s.ready_to_use,
                                group_snapshot_id=self._vid(s.group_id) if s.group_id else "")

    # ------------------------------------------------------------------ volumes

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.CreateVolumeResponse:
        require(request.name, "name")
        require(request.volume_capabilities, "volume_capabilities")
        source_kind = request.volume_content_source.WhichOneof("type") or ""
        source_id = ""
        source: Source | None = None
        if source_kind == "snapshot":
            source_id = request.volume_content_source.snapshot.snapshot_id
            require(source_id, "volume_content_source.snapshot.snapshot_id")
            source = self._source("snapshot", source_id)  # exists before the shape of the rest is judged
        elif source_kind == "volume":
            source_id = request.volume_content_source.volume.volume_id
            require(source_id, "volume_content_source.volume.volume_id")
            source = self._source("volume", source_id)
        block = self.plugin.check_capabilities(request.volume_capabilities)
        parameters = self.plugin.check_parameters(request.parameters)
        mutable = {k: v for k, v in parameters.items() if k in MUTABLE_PARAMETERS}
        mutable.update(self.plugin.check_mutable_parameters(request.mutable_parameters))
        size = requested_size(request.capacity_range, self.driver.capacity().total_bytes)
        self.plugin.check_accessibility(request.accessibility_requirements)
        with self.plugin.locks.hold(f"volume-name:{request.name}", f"source:{source_id}" if source_id else ""):
            existing = self.store.volume_by_name(request.name)
            if existing is not None:
                if existing.state is not RecordState.READY or existing.ephemeral:
                    raise AlreadyExists(f"volume name {request.name!r} is being deleted or used by an inline volume")
                if (existing.source_kind, existing.source_id) != (source_kind, source_id) \
                        or dict(existing.parameters) != parameters or not fits(existing.capacity, request.capacity_range):
                    raise AlreadyExists(f"volume {request.name!r} exists with other capacity, parameters or source")
                if existing.block != block:
                    raise AlreadyExists(f"volume {request.name!r} exists with {_access(existing.block)} access, "
                                        f"not {_access(block)}")
                return csi_pb2.CreateVolumeResponse(volume=self._volume_message(existing))
            if source is not None and source.remote:
                return self._create_from_elsewhere(request, source, size, parameters, block, mutable)
            record = self._create(request.name, size, parameters, source_kind, source_id, request.capacity_range,
                                  block, mutable)
            return csi_pb2.CreateVolumeResponse(volume=self._volume_message(record))

    def _source(self, kind: str, source_id: str) -> Source:
        """The content source, classified; a local one must exist (NOT_FOUND otherwise), and
        another node's only when this plugin has a channel to other nodes."""
        source = classify(kind, source_id, self.plugin.node_id)
        if source.kind == LOCAL:
            if kind == "snapshot":
                self._snapshot(source_id)
            else:
                self._volume(source_id)
        elif source.owner and self.plugin.dialer is None:
            raise NotFound(f"{kind} {source_id} is owned by node {source.owner}, and this plugin has no channel to "
                           "other nodes to pull it from (the node-to-node channel is not configured)")
        return source

    def _create_from_elsewhere(self, request: csi_pb2.CreateVolumeRequest, source: Source, size: int,
                               parameters: dict[str, str], block: bool,
                               mutable: dict[str, str]) -> csi_pb2.CreateVolumeResponse:
        if block:
            raise InvalidArgument(f"{source.source_id} is pulled as filesystem layers: a block volume cannot be "
                                  "restored or cloned from another node or from a backup")
        pulled: Pulled = self.plugin.sources.obtain(request.name, source, request.secrets, parameters)
        try:
            record = self._create(request.name, size, parameters, request.volume_content_source.WhichOneof("type"),
                                  source.source_id, request.capacity_range, block, mutable, pulled)
        finally:
            self.plugin.sources.finished(request.name)
        if pulled.cleanup is not None:
            pulled.cleanup()
        context = {CONTEXT_RESTORED_FROM: pulled.origin}
        if pulled.note:
            context[CONTEXT_NOTE] = pulled.note
        log.info("volume %s (%s) made from %s on layer %s%s", self._vid(record.layer), request.name, pulled.origin,
                 pulled.layer_id, f": {pulled.note}" if pulled.note else "")
        return csi_pb2.CreateVolumeResponse(volume=self._volume_message(record, context))

    def _create(self, name: str, size: int, parameters: dict[str, str], source_kind: str, source_id: str,
                range_: csi_pb2.CapacityRange, block: bool, mutable: dict[str, str],
                pulled: Pulled | None = None) -> VolumeRecord:
        parent = base = clone_of = None
        if pulled is not None:
            parent, size = pulled.layer_id, self._at_least(size, pulled.min_bytes, range_, source_kind)
        elif source_kind == "snapshot":
            snap = self._snapshot(source_id)
            self._same_access(self.driver.layer(snap.layer).block, block, "snapshot", source_id)
            parent, size = snap.layer, self._at_least(size, snap.size, range_, "snapshot")
        elif source_kind == "volume":
            src = self._volume(source_id)
            self._same_access(src.block, block, "volume", source_id)
            base, size = new_layer_id(CLONE_BASE_PREFIX), self._at_least(size, src.capacity, range_, "volume")
            clone_of = parse_id(source_id)[0]
        layer = new_layer_id(VOLUME_PREFIX)
        opts = CreateOpts(size_bytes=size or None, block=block, properties=mutable or None)

        def record(base_layer: str | None) -> VolumeRecord:
            return VolumeRecord(layer=layer, name=name, capacity=size, parameters=parameters, source_kind=source_kind,
                                source_id=source_id, base_layer=base_layer, state=RecordState.READY, block=block,
                                mutable=mutable)

        if clone_of is None:
            # the record first, made durable in the background while the driver makes (and syncs)
            # the layer: two databases' syncs at once; a crash between leaves a ready record without
            # its layer, which recovery removes (nothing was acknowledged)
            durable = self.store.add_volume_syncing(record(None))
            try:
                self.driver.create(layer, parent, opts)
                durable()
            except BaseException:
                self.driver.remove(layer)
                self.store.delete_volume(layer)
                raise
            return record(None)
        try:  # the driver freezes the source into base (hidden at once) or copies it once
            base = self.driver.clone(clone_of, layer, base, opts).parent
            return self.store.add_volume(record(base))
        except BaseException:
            for made in (layer, base):
                if made is not None:
                    self.driver.remove(made)
            raise

    @staticmethod
    def _same_access(source_block: bool, block: bool, what: str, source_id: str) -> None:
        if source_block != block:
            raise InvalidArgument(f"the source {what} {source_id} holds a {_access(source_block)} volume: it cannot "
                                  f"be restored or cloned for {_access(block)} access")

    @staticmethod
    def _at_least(size: int, source_size: int, range_: csi_pb2.CapacityRange, what: str) -> int:
        if range_.limit_bytes and source_size > range_.limit_bytes:
            raise OutOfRange(f"the source {what} holds {source_size} bytes, more than limit_bytes {range_.limit_bytes}")
        return max(size, source_size)

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeResponse:
        require(request.volume_id, "volume_id")
        try:
            layer = parse_local(request.volume_id, self.plugin.node_id, VOLUME_PREFIX)
        except NotFound:
            return csi_pb2.DeleteVolumeResponse()  # not issued by strata: nothing to delete
        with self.plugin.locks.hold(f"volume:{layer}", f"source:{request.volume_id}"):
            record = self.store.volume(layer)
            if record is None or record.ephemeral:
                return csi_pb2.DeleteVolumeResponse()
            used = self.store.publications(layer)
            if used:
                raise Busy(f"volume {request.volume_id} is still {_USE_WORDS.get(used[0].kind, used[0].kind)} at "
                           f"{used[0].path}: unpublish and unstage it first")
            self.store.set_volume(layer, state=RecordState.REMOVING)
            try:
                self.driver.remove(layer)
            except Busy:
                self.store.set_volume(layer, state=record.state)
                raise
            self.store.delete_volume(layer)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        record = self._volume(request.volume_id)
        try:
            block = self.plugin.check_capabilities(request.volume_capabilities)
            self.plugin.check_parameters(request.parameters)
        except InvalidArgument as exc:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(exc))
        if block != record.block:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(
                message=f"volume {request.volume_id} was created for {_access(record.block)} access")
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters))

    def _page(self, kind: str, items: list[Record], layer_of: Callable[[Record], str], max_entries: int,
              token: str) -> tuple[list[Record], str]:
        """Entries after the position in ``token`` (opaque, signed: :func:`read_token`;
        ABORTED otherwise), at most ``max_entries``, and the token for the rest."""
        if max_entries < 0:
            raise InvalidArgument(f"max_entries must not be negative, got {max_entries}")
        after = read_token(self.plugin.paging_key, kind, token) if token else ""
        ordered = sorted(items, key=layer_of)
        if after:
            ordered = [i for i in ordered if layer_of(i) > after]
        if max_entries and len(ordered) > max_entries:
            return ordered[:max_entries], issue_token(self.plugin.paging_key, kind,
                                                      layer_of(ordered[max_entries - 1]))
        return ordered, ""

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                    context: grpc.ServicerContext) -> csi_pb2.ListVolumesResponse:
        if request.max_entries < 0:
            raise InvalidArgument(f"max_entries must not be negative, got {request.max_entries}")
        after = read_token(self.plugin.paging_key, "volumes", request.starting_token) \
            if request.starting_token else ""
        limit = request.max_entries
        rows = self.store.listed_volumes(after, limit + 1 if limit else 0)  # one more: is there a next page
        page, token = rows[:limit] if limit else rows, ""
        if limit and len(rows) > limit:
            token = issue_token(self.plugin.paging_key, "volumes", page[-1].layer)
        response = csi_pb2.ListVolumesResponse(next_token=token)
        topology = csi_pb2.Topology(segments=self.plugin.topology())  # once per page
        for v in page:
            self._fill_volume(response.entries.add().volume, v, topology)
        return response

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetCapacityResponse:
        capacity = self.driver.capacity()
        if request.HasField("accessible_topology") and not self.plugin.topology_matches(
                request.accessible_topology.segments):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        try:
            if request.volume_capabilities:
                self.plugin.check_capabilities(request.volume_capabilities)
            self.plugin.check_parameters(request.parameters)
        except InvalidArgument:
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        return csi_pb2.GetCapacityResponse(available_capacity=capacity.available_bytes,
                                           maximum_volume_size={"value": capacity.total_bytes})

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc={"type": c}) for c in CAPABILITIES])

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.HasField("capacity_range"), "capacity_range")
        record = self._volume(request.volume_id)
        if request.HasField("volume_capability"):
            self.plugin.mount_request(request.volume_capability)
        range_ = request.capacity_range
        with self.plugin.locks.hold(f"volume:{record.layer}"):
            capacity = self.driver.capacity()
            size = requested_size(range_, capacity.total_bytes)
            if range_.limit_bytes and range_.limit_bytes < record.capacity:
                raise OutOfRange(f"volume {request.volume_id} holds {record.capacity} bytes: limit_bytes "
                                 f"{range_.limit_bytes} would shrink it, and volumes cannot shrink")
            if size - record.capacity > capacity.available_bytes:
                raise OutOfRange(f"growing volume {request.volume_id} from {record.capacity} to {size} bytes needs "
                                 f"{size - record.capacity} bytes, but the {self.driver.name} backing store has "
                                 f"only {capacity.available_bytes} bytes free")
            if size > record.capacity:
                try:
                    self.driver.resize(record.layer, size)
                except Unsupported:
                    pass  # the driver cannot enforce sizes: the capacity is recorded (see module docstring)
                self.store.set_volume(record.layer, capacity=size)
            current = max(size, record.capacity)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=current, node_expansion_required=False)

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerModifyVolumeResponse:
        require(request.volume_id, "volume_id")
        record = self._volume(request.volume_id)
        require(request.mutable_parameters, "mutable_parameters")
        wanted = self.plugin.check_mutable_parameters(request.mutable_parameters)
        if record.block:
            raise InvalidArgument(f"volume {request.volume_id} is a block volume: it has no filesystem whose "
                                  f"{', '.join(sorted(wanted))} could change")
        with self.plugin.locks.hold(f"volume:{record.layer}"):
            self.driver.modify(record.layer, wanted)
            self.store.set_volume(record.layer, mutable={**record.mutable, **wanted})
        return csi_pb2.ControllerModifyVolumeResponse()

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext) -> csi_pb2.ControllerGetVolumeResponse:
        require(request.volume_id, "volume_id")
        record = self._volume(request.volume_id)
        healthy = self.driver.exists(record.layer)
        condition = csi_pb2.VolumeCondition(
            abnormal=not healthy,
            message="layer present" if healthy else f"layer {record.layer} is missing from the {self.driver.name} store")
        published = [self.plugin.node_id] if self.store.publications(record.layer) else []
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_message(record),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(published_node_ids=published,
                                                                   volume_condition=condition))

    # ------------------------------------------------------------------ snapshots

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.CreateSnapshotResponse:
        require(request.source_volume_id, "source_volume_id")
        require(request.name, "name")
        made = self.store.snapshot_by_name(request.name)
        if made is None or self._vid(made.source_layer) != request.source_volume_id:
            self._volume(request.source_volume_id)  # exists, before the shape of the parameters
        wanted = check_snapshot_parameters(request.parameters, allow_backup=True)
        credentials = docker_config_of(request.secrets) if wanted.target else None
        with self.plugin.locks.hold(f"snapshot-name:{request.name}", f"source:{request.source_volume_id}"):
            existing = self.store.snapshot_by_name(request.name)
            if existing is not None:
                if existing.state is not RecordState.READY \
                        or self._vid(existing.source_layer) != request.source_volume_id:
                    raise AlreadyExists(f"snapshot {request.name!r} exists for another source volume")
                if existing.backup_target != wanted.target:
                    raise AlreadyExists(f"snapshot {request.name!r} exists with backup target "
                                        f"{existing.backup_target or 'none'}, not {wanted.target or 'none'}")
                if existing.backup_state in (BACKUP_FAILED, BACKUP_UPLOADING) \
                        and not self.plugin.uploads.running(existing.layer):
                    # a failed upload, or one a restart interrupted: the repeated call starts it again
                    self._upload(existing, wanted.compression, credentials)
                    existing = self.store.snapshot(existing.layer) or existing
                return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_message(existing))
            source = self._volume(request.source_volume_id)
            layer = new_layer_id(SNAPSHOT_PREFIX)
            try:
                self.driver.freeze(source.layer, layer)
                record = self.store.add_snapshot(SnapshotRecord(
                    layer=layer, name=request.name, source_layer=source.layer, size=source.capacity,
                    state=RecordState.READY, backup_target=wanted.target,
                    backup_state=BACKUP_UPLOADING if wanted.target else ""))
            except BaseException:
                self.driver.remove(layer)
                raise
            if wanted.target:
                self._upload(record, wanted.compression, credentials)
            elif self.plugin.config.digest_snapshots:
                self.plugin.digests.later(layer)  # its first restore elsewhere finds the digests made
            return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_message(record))

    def _upload(self, record: SnapshotRecord, compression: str, credentials: object) -> None:
        log.info("snapshot %s (%s): uploading to %s in the background", self._vid(record.layer), record.name,
                 record.backup_target)
        self.plugin.uploads.start(record.layer, self._vid(record.layer), record.name, record.backup_target,
                                  compression, record.size, credentials)  # type: ignore[arg-type]

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.DeleteSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        try:
            layer = parse_local(request.snapshot_id, self.plugin.node_id, SNAPSHOT_PREFIX)
        except NotFound:
            return csi_pb2.DeleteSnapshotResponse()
        with self.plugin.locks.hold(f"snapshot:{layer}", f"source:{request.snapshot_id}"):
            record = self.store.snapshot(layer)
            if record is None:
                return csi_pb2.DeleteSnapshotResponse()
            if record.group_id:
                raise FailedPrecondition(f"snapshot {request.snapshot_id} belongs to group snapshot "
                                         f"{self._vid(record.group_id)}: delete the group (DeleteVolumeGroupSnapshot)")
            if record.backup_target:
                if self.plugin.uploads.running(layer):
                    raise Aborted(f"snapshot {request.snapshot_id} is being uploaded to {record.backup_target}: "
                                  "retry when the upload is done")
                # the tag first: if the target cannot be reached, nothing changed and the call is retried
                self.plugin.uploads.delete_tag(record.backup_target, layer, docker_config_of(request.secrets))
            self.store.set_snapshot(layer, state=RecordState.REMOVING)
            try:
                self.driver.remove(layer)  # hidden while restored volumes use it
            except Busy:  # in use (e.g. another node is pulling it): nothing changed, the call is retried
                self.store.set_snapshot(layer, state=record.state)
                raise
            self.store.delete_snapshot(layer)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                      context: grpc.ServicerContext) -> csi_pb2.ListSnapshotsResponse:
        if request.snapshot_id and is_backup_reference(request.snapshot_id):
            entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._backup_message(request.snapshot_id,
                                                                                          request.secrets))]
            return csi_pb2.ListSnapshotsResponse(entries=entries if not request.starting_token else [])
        snapshots = self.store.snapshots(state=RecordState.READY)
        if request.snapshot_id:
            try:
                layer = parse_local(request.snapshot_id, self.plugin.node_id, SNAPSHOT_PREFIX)
                snapshots = [s for s in snapshots if s.layer == layer]
            except NotFound:
                snapshots = []
        if request.source_volume_id:
            try:
                source = parse_local(request.source_volume_id, self.plugin.node_id, VOLUME_PREFIX)
                snapshots = [s for s in snapshots if s.source_layer == source]
            except NotFound:
                snapshots = []
        page, token = self._page("snapshots", snapshots, lambda s: s.layer, request.max_entries, request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot_message(s)) for s in page],
            next_token=token)

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        if is_backup_reference(request.snapshot_id):
            return csi_pb2.GetSnapshotResponse(snapshot=self._backup_message(request.snapshot_id, request.secrets))
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot_message(self._snapshot(request.snapshot_id)))

    def _backup_message(self, snapshot_id: str, secrets: Mapping[str, str]) -> csi_pb2.Snapshot:
        """A backup named as a snapshot handle (a statically provisioned VolumeSnapshotContent):
        ready, since its content is fixed by digest; its size is the capacity the backup records.
        NOT_FOUND when the target answers that it does not have it."""
        source = classify("snapshot", snapshot_id, self.plugin.node_id)
        assert source.reference is not None
        size, created = 0, 0.0
        try:
            with closing(open_target(source.reference, credentials=docker_config_of(secrets))) as target:
                art = read_artifact(target, source.reference.require_digest())
                size = art.facts.capacity_bytes or 0
                data, _ = target.get_manifest(art.manifest_digest)
            stamp = json.loads(data).get("annotations", {}).get(ANNOTATION_CREATED, "")
            if stamp:
                created = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        except NotFound:
            raise
        except (StrataError, ValueError) as exc:
            log.warning("backup %s: cannot read its facts now (%s); answering it as ready", snapshot_id, exc)
        return csi_pb2.Snapshot(snapshot_id=snapshot_id, size_bytes=size, creation_time=timestamp(created),
                                ready_to_use=True)


__all__ = ["ControllerService"]
