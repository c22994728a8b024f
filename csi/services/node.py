"""CSI Node service: layers mounted where kubelet asks.

* NodeStageVolume: ``driver.get(layer, mount_label)`` then a bind mount of the returned
  path at the staging path (read-only and nosuid/nodev/noexec/noatime when asked;
  ``volume_mount_group`` makes the volume root group-owned and setgid).
  NodeUnstageVolume: unmount, ``driver.put``.
* NodePublishVolume: bind mount staging -> target (read-only when asked), creating the
  target directory; FAILED_PRECONDITION when the volume is not staged at the given path.
  NodeUnpublishVolume: unmount, remove the target directory. Access modes are enforced
  here, against the volume's other publications on the node
  (:func:`csi.services.requests.check_sharing`: SINGLE_NODE_SINGLE_WRITER alone,
  SINGLE_NODE_WRITER one read/write publication, MULTI_WRITER and READER_ONLY shared;
  FAILED_PRECONDITION otherwise); MULTI_NODE_* modes are refused everywhere (node-local).
* SELinux: a ``context=...`` mount flag (kubelet sends it when the CSIDriver says
  ``seLinuxMount: true``) is passed to the driver at stage as the mount label; drivers that
  give each volume its own superblock (overlay mount, devicemapper filesystem) put it on
  that mount; vfs and btrfs cannot and the stage is INVALID_ARGUMENT naming the driver.
* Inline ephemeral volumes (``csi.storage.k8s.io/ephemeral: "true"``): the layer is
  created at publish (recorded under the name ``ephemeral:<kubelet volume id>``),
  gotten and bind-mounted at the target; unpublish unmounts, puts and removes it.
* Block volumes (volumeMode Block, devicemapper): NodeStageVolume activates the volume's
  device (``driver.get_block``) and mounts nothing — the staging directory stays empty;
  NodePublishVolume creates the target as an empty *file* and bind-mounts the device node
  onto it (read-only when asked: the mount is ``ro``, but the kernel lets a device node be
  opened for writing on a read-only mount, so a reader-only publication relies on the
  container runtime's device permission, as kubelet sets it); NodeUnpublishVolume
  unmounts and removes the file; NodeGetVolumeStats reports the device's total bytes only;
  NodeExpandVolume has no filesystem to grow (ControllerExpandVolume grew the device).
  A volume staged or published with the other access type than it was created for is
  INVALID_ARGUMENT.
* Paths must be absolute and normalised (:mod:`csi.services.requests`); checks follow the
  one order stated there (required fields, the volume exists, its state, then the shape of
  paths and capabilities): a volume ID strata did not issue is NOT_FOUND before any path is
  looked at. Targets are made, bound and
  removed by :mod:`csi.services.targets`; every mount goes through :mod:`csi.host.mount`.
* NodeGetVolumeStats reports what the layer itself occupies where the driver knows it
  (``driver.usage``), else what the filesystem reports; the driver is reached only through
  its contract (:class:`csi.graphdriver.driver.Driver`).

Crash protocol: a publication row is written ``pending`` before the mount and marked
``ready`` after it; teardown marks it ``removing`` first and deletes it last. The intent
(``pending``, ``removing``) is committed without waiting for its sync: it must survive
``kill -9`` (a committed row does) but not a power cut, which takes every mount with it;
the call's last write (``ready``, the delete) waits for the one sync that makes both
durable before the call is acknowledged. An inline volume's record is
written ``pending`` before its layer is created, and both turn ``ready`` in one
transaction. The ``undo_*`` methods here undo a call that failed while it ran; after a
crash, start-up recovery (:mod:`csi.services.recovery`) does its own undo from the
records alone — it re-establishes ``ready`` mounts and undoes the rest.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from csi.graphdriver.driver import CreateOpts
from csi.host import mount as mnt
from csi.ids import new_layer_id
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.plugin import PluginService
from csi.services.requests import EPHEMERAL_KEY, KUBERNETES_PREFIX, MountRequest, check_path, check_sharing, require
from csi.services.targets import apply_mount_group, bind, prepare_dir, prepare_file, remove_target
from csi.services.volume_ids import VOLUME_PREFIX, parse_local
from csi.state.store import PUBLISH, STAGE, Publication, RecordState, VolumeRecord

_Cap = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (_Cap.STAGE_UNSTAGE_VOLUME, _Cap.GET_VOLUME_STATS, _Cap.EXPAND_VOLUME, _Cap.VOLUME_CONDITION,
                _Cap.SINGLE_NODE_MULTI_WRITER, _Cap.VOLUME_MOUNT_GROUP)
EPHEMERAL_NAME = "ephemeral:"
EPHEMERAL_PARAMETERS = ("size",)


def device_bytes(device: str | Path) -> int:
    """The size of a block device, read from the device itself."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_access(record: VolumeRecord, want: MountRequest, volume_id: str) -> None:
    """The capability must ask for the access type the volume was created for."""
    if want.block != record.block:
        created, asked = ("block", "mount") if record.block else ("mount", "block")
        raise InvalidArgument(f"volume {volume_id} was created for {created} access; it cannot be used with "
                              f"{asked} access")


class NodeService(PluginService, csi_pb2_grpc.NodeServicer):
    def _layer(self, volume_id: str) -> VolumeRecord:
        layer = parse_local(volume_id, self.plugin.node_id, VOLUME_PREFIX)
        record = self.store.volume(layer)
        if record is None or record.state is not RecordState.READY or record.ephemeral:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    # ------------------------------------------------------------------ stage

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        record = self._layer(request.volume_id)
        staging = check_path(request.staging_target_path, "staging_target_path")
        want = self.plugin.mount_request(request.volume_capability)
        check_access(record, want, request.volume_id)
        with self.plugin.locks.hold(f"volume:{record.layer}", f"path:{staging}"):
            existing = self.store.publication_at(STAGE, staging)
            if existing is not None:
                if existing.layer != record.layer or existing.readonly != want.readonly \
                        or existing.flags != want.flags or existing.mount_group != want.mount_group:
                    raise AlreadyExists(f"{staging} is already staged with another volume or other options")
                return csi_pb2.NodeStageVolumeResponse()
            made_dir = not os.path.lexists(staging)
            prepare_dir(staging, "staging_target_path")
            pub = self.store.add_publication(Publication(record.layer, STAGE, staging, want.readonly, want.flags,
                                                         want.mount_group, mode=want.mode), durable=False)
            try:
                if record.block:
                    self.driver.get_block(pub.layer)  # the device is active; nothing is mounted
                else:
                    self.stage_mount(pub, want.selinux_label)
            except BaseException:
                self.undo_stage(pub)
                if made_dir:  # a failed stage leaves no directory it made
                    remove_target(staging)
                raise
            self.store.set_publication(pub, RecordState.READY)
        return csi_pb2.NodeStageVolumeResponse()

    def stage_mount(self, pub: Publication, label: str = "") -> None:
        path = self.driver.get(pub.layer, label)
        if label:
            self._check_label(path, label)
        if pub.mount_group:
            apply_mount_group(path, pub.mount_group)
        bind(path, pub.path, pub.readonly, pub.flags)

    def _check_label(self, path: Path, label: str) -> None:
        """A ``context=`` flag needs a superblock of the volume's own: SELinux labels a whole
        superblock. Where the driver gave the volume one (overlay, devicemapper), it passed
        the option to mount(2) (``get(layer, mount_label)``); where the volume is a
        directory or subvolume of a shared filesystem (vfs, btrfs), no mount can carry it,
        and the stage is refused (and undone) rather than leave the label unapplied."""
        own = mnt.find_mount(path)
        if own is None or own.root != "/":
            raise InvalidArgument(
                f"mount flag context={label} cannot be honoured by the {self.driver.name} layered driver: its "
                "volumes are directories of one shared filesystem, and SELinux labels a whole superblock. Leave "
                "seLinuxMount off in the CSIDriver for this node's driver (the container runtime then relabels "
                "the volume's files); per-volume superblocks: overlay, devicemapper")

    def undo_stage(self, pub: Publication) -> None:
        """Unmount, put, forget. Tolerates a half-made stage."""
        self.store.set_publication(pub, RecordState.REMOVING, durable=False)
        mnt.unmount_all(pub.path)
        self.driver.put(pub.layer)
        self.store.delete_publication(pub)

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodeUnstageVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.staging_target_path, "staging_target_path")
        layer = parse_local(request.volume_id, self.plugin.node_id, VOLUME_PREFIX)
        if self.store.volume(layer) is None:
            raise NotFound(f"volume {request.volume_id} does not exist")
        staging = check_path(request.staging_target_path, "staging_target_path")
        with self.plugin.locks.hold(f"volume:{layer}", f"path:{staging}"):
            pub = self.store.publication_at(STAGE, staging)
            if pub is None or pub.layer != layer:
                return csi_pb2.NodeUnstageVolumeResponse()
            self.undo_stage(pub)
        return csi_pb2.NodeUnstageVolumeResponse()

    # ------------------------------------------------------------------ publish

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        require(request.HasField("volume_capability"), "volume_capability")
        if request.volume_context.get(EPHEMERAL_KEY) == "true":  # no object to find: made here
            target = check_path(request.target_path, "target_path")
            want = self.plugin.mount_request(request.volume_capability)
            self._publish_ephemeral(request, target, want, want.readonly or request.readonly)
            return csi_pb2.NodePublishVolumeResponse()
        require(request.staging_target_path, "staging_target_path")
        record = self._layer(request.volume_id)
        target = check_path(request.target_path, "target_path")
        staging = check_path(request.staging_target_path, "staging_target_path")
        if staging == target:
            raise InvalidArgument("target_path must differ from staging_target_path")
        want = self.plugin.mount_request(request.volume_capability)
        readonly = want.readonly or request.readonly
        check_access(record, want, request.volume_id)
        with self.plugin.locks.hold(f"volume:{record.layer}", f"path:{target}"):
            staged = self.store.publication_at(STAGE, staging)
            if staged is None or staged.layer != record.layer or staged.state is not RecordState.READY:
                raise FailedPrecondition(f"volume {request.volume_id} is not staged at {staging}")
            existing = self.store.publication_at(PUBLISH, target)
            if existing is not None:
                if existing.layer != record.layer or existing.readonly != readonly or existing.flags != want.flags \
                        or existing.mode not in (0, want.mode):
                    raise AlreadyExists(f"{target} is already published with another volume or other options")
                return csi_pb2.NodePublishVolumeResponse()
            check_sharing([(p.mode, p.readonly, p.path) for p in self.store.publications(record.layer, PUBLISH)],
                          want.mode, readonly, request.volume_id)
            if record.block:
                prepare_file(target, "target_path")
            else:
                prepare_dir(target, "target_path")
            pub = self.store.add_publication(Publication(record.layer, PUBLISH, target, readonly, want.flags,
                                                         source=staging, mode=want.mode), durable=False)
            try:
                bind(self.driver.block_device(record.layer) if record.block else staging, target, readonly,
                     want.flags)
            except BaseException:
                self.undo_publish(pub)
                raise
            self.store.set_publication(pub, RecordState.READY)
        return csi_pb2.NodePublishVolumeResponse()

    def undo_publish(self, pub: Publication) -> None:
        self.store.set_publication(pub, RecordState.REMOVING, durable=False)
        mnt.unmount_all(pub.path)
        remove_target(pub.path)
        self.store.delete_publication(pub)

    def _publish_ephemeral(self, request: csi_pb2.NodePublishVolumeRequest, target: str, want: MountRequest,
                           readonly: bool) -> None:
        volume_id = request.volume_id
        if len(volume_id) > 128 or not volume_id.isprintable():
            raise InvalidArgument(f"volume_id {volume_id[:80]!r} is too long or not printable")
        attributes = {k: v for k, v in request.volume_context.items() if not k.startswith(KUBERNETES_PREFIX)}
        unknown = sorted(set(attributes) - set(EPHEMERAL_PARAMETERS))
        if unknown:
            raise InvalidArgument(f"unknown inline volume attribute(s) {', '.join(unknown)}; known: size")
        size = attributes.get("size", "0")
        if not size.isdigit():
            raise InvalidArgument(f"inline volume attribute size={size!r} must be a number of bytes")
        if want.block:
            raise InvalidArgument("inline ephemeral volumes are filesystems: use mount access")
        name = EPHEMERAL_NAME + volume_id
        with self.plugin.locks.hold(f"volume-name:{name}", f"path:{target}"):
            existing = self.store.volume_by_name(name)
            if existing is not None:
                pubs = self.store.publications(existing.layer, PUBLISH)
                if existing.ephemeral and any(p.path == target and p.readonly == readonly for p in pubs):
                    return
                raise AlreadyExists(f"inline volume {volume_id} is already published elsewhere or differently")
            if self.store.publication_at(PUBLISH, target) is not None:
                raise AlreadyExists(f"{target} is already published with another volume")
            prepare_dir(target, "target_path")
            record = self.store.add_volume(VolumeRecord(layer=new_layer_id(VOLUME_PREFIX), name=name,
                                                        capacity=int(size), ephemeral=True))
            pub = Publication(record.layer, PUBLISH, target, readonly, want.flags, mode=want.mode)
            try:
                self.driver.create(record.layer, None, CreateOpts(size_bytes=int(size) or None))
                self.store.add_publication(pub)
                path = self.driver.get(record.layer, want.selinux_label)
                if want.selinux_label:
                    self._check_label(path, want.selinux_label)
                if want.mount_group:
                    apply_mount_group(path, want.mount_group)
                bind(path, target, readonly, want.flags)
            except BaseException:
                self.undo_ephemeral(record, pub)
                raise
            with self.store.transaction():
                self.store.set_publication(pub, RecordState.READY)
                self.store.set_volume(record.layer, state=RecordState.READY)

    def undo_ephemeral(self, record: VolumeRecord, pub: Publication) -> None:
        """Unmount, put and remove an inline volume's layer; forget it."""
        with self.store.transaction():
            self.store.set_volume(record.layer, state=RecordState.REMOVING)
            self.store.set_publication(pub, RecordState.REMOVING)
        mnt.unmount_all(pub.path)
        remove_target(pub.path)
        self.driver.put(record.layer)
        self.driver.remove(record.layer)
        with self.store.transaction():
            self.store.delete_publication(pub)
            self.store.delete_volume(record.layer)

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> csi_pb2.NodeUnpublishVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.target_path, "target_path")
        inline = self.store.volume_by_name(EPHEMERAL_NAME + request.volume_id)
        if inline is not None:
            target = check_path(request.target_path, "target_path")
            with self.plugin.locks.hold(f"volume-name:{inline.name}", f"path:{target}"):
                pub = self.store.publication_at(PUBLISH, target)
                if pub is not None and pub.layer == inline.layer:
                    self.undo_ephemeral(inline, pub)
            return csi_pb2.NodeUnpublishVolumeResponse()
        try:
            layer = parse_local(request.volume_id, self.plugin.node_id, VOLUME_PREFIX)
        except NotFound:
            # not a strata ID: an inline volume already unpublished (kubelet retries with
            # its own ID), or foreign. Nothing of ours to undo, and no path is touched.
            return csi_pb2.NodeUnpublishVolumeResponse()
        if self.store.volume(layer) is None:
            raise NotFound(f"volume {request.volume_id} does not exist")
        target = check_path(request.target_path, "target_path")
        with self.plugin.locks.hold(f"volume:{layer}", f"path:{target}"):
            pub = self.store.publication_at(PUBLISH, target)
            if pub is not None and pub.layer == layer:
                self.undo_publish(pub)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # ------------------------------------------------------------------ stats, expansion, info

    def _volume_path(self, volume_id: str, volume_path: str) -> tuple[VolumeRecord, Publication]:
        require(volume_id, "volume_id")
        require(volume_path, "volume_path")
        inline = self.store.volume_by_name(EPHEMERAL_NAME + volume_id)
        record = inline if inline is not None else self._layer(volume_id)
        path = check_path(volume_path, "volume_path")
        for pub in self.store.publications(record.layer):
            if pub.path == path and pub.state is RecordState.READY:
                return record, pub
        raise NotFound(f"volume {volume_id} is not staged or published at {path}")

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> csi_pb2.NodeGetVolumeStatsResponse:
        record, pub = self._volume_path(request.volume_id, request.volume_path)
        problems = []
        if not self.driver.exists(record.layer):
            problems.append(f"layer {record.layer} is missing from the {self.driver.name} store")
        elif record.block:
            return self._block_stats(record, pub)
        if not mnt.is_mount_point(pub.path):
            problems.append(f"{pub.path} is no longer mounted")
        condition = csi_pb2.VolumeCondition(abnormal=bool(problems), message="; ".join(problems) or "healthy")
        if problems:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=condition)
        st = os.statvfs(pub.path)
        fs_total, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        used = self.driver.usage(record.layer)
        if used is None:
            used = fs_total - st.f_bfree * st.f_frsize
        total = record.capacity or fs_total
        available = max(0, min(fs_free, total - used))
        Usage = csi_pb2.VolumeUsage
        usage = [Usage(unit=Usage.BYTES, total=total, available=available, used=used)]
        if st.f_files:  # btrfs allocates inodes dynamically and reports none: no inode figure then
            usage.append(Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail,
                               used=st.f_files - st.f_ffree))
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def _block_stats(self, record: VolumeRecord, pub: Publication) -> csi_pb2.NodeGetVolumeStatsResponse:
        """A block volume: the device's size (total bytes only: what is used is the user's business)."""
        problems = []
        try:
            total = device_bytes(self.driver.block_device(record.layer))
        except (FailedPrecondition, OSError) as exc:
            problems.append(f"the device of volume layer {record.layer} is not active: {exc}")
        if pub.kind == PUBLISH and not mnt.is_mount_point(pub.path):
            problems.append(f"{pub.path} is no longer bound to the volume's device")
        condition = csi_pb2.VolumeCondition(abnormal=bool(problems), message="; ".join(problems) or "healthy")
        if problems:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=condition)
        usage = csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=total)
        return csi_pb2.NodeGetVolumeStatsResponse(usage=[usage], volume_condition=condition)

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        """No filesystem to grow here: layered directories have none, a devicemapper volume's
        filesystem (or block device) was grown by ControllerExpandVolume. Report the capacity."""
        record, _ = self._volume_path(request.volume_id, request.volume_path)
        if request.HasField("volume_capability"):
            check_access(record, self.plugin.mount_request(request.volume_capability), request.volume_id)
        range_ = request.capacity_range
        if range_.required_bytes < 0 or range_.limit_bytes < 0:
            raise OutOfRange("capacity range must not be negative")
        if range_.limit_bytes and range_.limit_bytes < record.capacity:
            raise OutOfRange(f"volume {request.volume_id} holds {record.capacity} bytes: limit_bytes "
                             f"{range_.limit_bytes} would shrink it, and volumes cannot shrink")
        if range_.required_bytes > record.capacity:
            raise OutOfRange(f"volume {request.volume_id} holds {record.capacity} bytes, less than the "
                             f"{range_.required_bytes} asked: ControllerExpandVolume grows it (nothing to do here)")
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=record.capacity)

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc={"type": c}) for c in CAPABILITIES])

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                    context: grpc.ServicerContext) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.plugin.node_id, max_volumes_per_node=self.plugin.config.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments=self.plugin.topology()))
