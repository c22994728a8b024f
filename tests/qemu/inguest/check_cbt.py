"""Changed-block tracking on a real thin pool (CSI SnapshotMetadata), inside the qemu guest.

A plugin on devicemapper (loop-lvm pool, 64 KiB blocks) in this process, served on a unix
socket by a gRPC server built with ``new_server`` (the one error seam) holding the
Identity, Controller and SnapshotMetadata services; a real gRPC client:

* a 64 MiB block volume (CreateVolume, volumeMode Block); known blocks written to its thin
  device -> CreateSnapshot s1; more known blocks written (one overwritten, one discarded)
  -> CreateSnapshot s2;
* GetMetadataAllocated(s1) / (s2) list exactly the blocks written (a 512-byte write counts
  its whole block), GetMetadataDelta(s1, s2) exactly the blocks written or discarded
  between — from the pool's metadata, not the data; FIXED_LENGTH pool blocks, ascending;
  paging with max_results and resuming with starting_offset give the same list;
* a volume restored from s1, written, snapshotted (s3): the delta s1 -> s3 is that write;
  an unrelated volume's snapshot, a filesystem volume's snapshot: FAILED_PRECONDITION;
  starting_offset past the capacity: OUT_OF_RANGE;
* a metadata snapshot left held (a killed process) does not stop the next call, and none
  is held after a call; the next start-up releases one; Identity advertises
  SNAPSHOT_METADATA_SERVICE.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.graphdriver.devicemapper import ioctl as dm
from csi.graphdriver.devicemapper.driver import DevmapperDriver
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.services.controller import ControllerService
from csi.services.identity import IdentityService
from csi.services.listen import listen_unix, new_server
from csi.services.plugin import Plugin, PluginConfig
from csi.services.snapshot_metadata import SnapshotMetadataService
from csi.services.volume_ids import parse_id

BLOCK = 64 << 10
VOLUME = 64 << 20
BLKDISCARD = 0x1277
OPTIONS = {"dm.loopback": "true", "dm.loopdatasize": "1G", "dm.loopmetadatasize": "16M", "dm.blocksize": "64K",
           "dm.basesize": "32M", "dm.min_free_space": "5"}
RWO = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
C = grpc.StatusCode


def block_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=pb.VolumeCapability.AccessMode(mode=RWO))


def mount_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=pb.VolumeCapability.AccessMode(mode=RWO))


@dataclass
class Node:
    plugin: Plugin
    controller: csi_pb2_grpc.ControllerStub
    meta: csi_pb2_grpc.SnapshotMetadataStub
    identity: csi_pb2_grpc.IdentityStub

    def volume(self, name: str, block: bool = True, source: str = "") -> str:
        req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=VOLUME),
                                     volume_capabilities=[block_cap() if block else mount_cap()])
        if source:
            req.volume_content_source.snapshot.snapshot_id = source
        return self.controller.CreateVolume(req).volume.volume_id

    def snapshot(self, name: str, volume_id: str) -> str:
        return self.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)).snapshot.snapshot_id

    def write(self, volume_id: str, blocks: list[int], tag: int, *, partial: bool = False) -> None:
        layer, _ = parse_id(volume_id)
        dev = self.plugin.driver.get_block(layer)
        try:
            fd = os.open(dev, os.O_WRONLY)
            try:
                for b in blocks:
                    data = bytes([(b * 7 + tag) % 251 + 1]) * (512 if partial else BLOCK)
                    os.pwrite(fd, data, b * BLOCK + (4096 if partial else 0))
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            self.plugin.driver.put(layer)

    def discard(self, volume_id: str, block: int) -> None:
        layer, _ = parse_id(volume_id)
        dev = self.plugin.driver.get_block(layer)
        try:
            fd = os.open(dev, os.O_WRONLY)
            try:
                fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", block * BLOCK, BLOCK))
            finally:
                os.close(fd)
        finally:
            self.plugin.driver.put(layer)

    def allocated(self, snapshot_id: str, **kw: Any) -> list[pb.GetMetadataAllocatedResponse]:
        return list(self.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snapshot_id, **kw)))

    def delta(self, base: str, target: str, **kw: Any) -> list[pb.GetMetadataDeltaResponse]:
        return list(self.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(base_snapshot_id=base,
                                                                          target_snapshot_id=target, **kw)))


@pytest.fixture
def node(dm_home: Path) -> Iterator[Node]:
    root = dm_home.parent  # the driver home is <root>/devicemapper: dm_home, released after the check
    plugin = Plugin(PluginConfig(root=root, node_id="guest", driver="devicemapper", driver_options=OPTIONS))
    server = new_server(4, "cbt")
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(plugin), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(plugin), server)
    csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(plugin), server)
    endpoint = listen_unix(server, root / "csi.sock")
    server.start()
    plugin.ready.set()
    channel = grpc.insecure_channel(endpoint)
    try:
        yield Node(plugin, csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.SnapshotMetadataStub(channel),
                   csi_pb2_grpc.IdentityStub(channel))
    finally:
        channel.close()
        server.stop(0)
        plugin.driver.release_pool()  # type: ignore[attr-defined]
        plugin.close()


def offsets(responses: list[Any]) -> list[int]:
    for r in responses:
        assert r.block_metadata_type == pb.FIXED_LENGTH
        assert r.volume_capacity_bytes == VOLUME
        assert all(m.size_bytes == BLOCK for m in r.block_metadata)
    got = [m.byte_offset for r in responses for m in r.block_metadata]
    assert got == sorted(set(got))
    return got


def at(blocks: set[int]) -> list[int]:
    return [b * BLOCK for b in sorted(blocks)]


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code()


def held_metadata_root(pool: str) -> str:
    _, _, params = dm.table(pool, status=True)
    return params.split()[3]


def test_delta_lists_exactly_the_blocks_written_between(node: Node) -> None:
    service = pb.PluginCapability.Service
    caps = {c.service.type for c in node.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities}
    assert service.SNAPSHOT_METADATA_SERVICE in caps

    vol = node.volume("cbt-vol")
    first = {0, 3, 100, 101, 1023}
    node.write(vol, sorted(first), 1)
    node.write(vol, [500], 1, partial=True)  # 512 bytes inside block 500: the whole block is allocated
    s1 = node.snapshot("cbt-s1", vol)
    second = {3, 200, 700, 701, 702, 703}  # block 3 overwritten
    node.write(vol, sorted(second), 2)
    node.discard(vol, 1023)  # unmapped since s1: reads zeros now, so it changed
    s2 = node.snapshot("cbt-s2", vol)

    assert offsets(node.allocated(s1)) == at(first | {500})
    assert offsets(node.allocated(s2)) == at((first | {500} | second) - {1023})
    changed = second | {1023}
    assert offsets(node.delta(s1, s2)) == at(changed)
    assert offsets(node.delta(s2, s2)) == []

    # paging and resuming: three entries a response; resume after the 4th block
    pages = node.delta(s1, s2, max_results=3)
    assert [len(r.block_metadata) for r in pages] == [3, 3, 1]
    fourth = at(changed)[3]
    assert offsets(node.delta(s1, s2, starting_offset=fourth + BLOCK)) == at(changed)[4:]
    assert offsets(node.allocated(s2, starting_offset=fourth + 17)) == [o for o in at((first | {500} | second) - {1023})
                                                                        if o >= fourth]
    assert code_of(lambda: node.allocated(s1, starting_offset=VOLUME + 1)) == C.OUT_OF_RANGE

    # a restore of s1, written and snapshotted: compared with s1 through its parent
    restored = node.volume("cbt-restored", source=s1)
    node.write(restored, [50], 3)
    s3 = node.snapshot("cbt-s3", restored)
    assert offsets(node.delta(s1, s3)) == at({50})

    # what cannot be compared
    other = node.snapshot("cbt-other-s", node.volume("cbt-other"))
    assert code_of(lambda: node.delta(s1, other)) == C.FAILED_PRECONDITION
    fs_snap = node.snapshot("cbt-fs-s", node.volume("cbt-fs", block=False))
    assert code_of(lambda: node.allocated(fs_snap)) == C.FAILED_PRECONDITION
    assert code_of(lambda: node.delta(s1, fs_snap)) == C.FAILED_PRECONDITION

    # a metadata snapshot a killed process left held is released and taken again; none stays held
    pool = node.plugin.driver.pool  # type: ignore[attr-defined]
    dm.message(pool, "reserve_metadata_snap")
    assert held_metadata_root(pool) != "-"
    assert offsets(node.delta(s1, s2)) == at(changed)
    assert held_metadata_root(pool) == "-"


def test_start_up_releases_a_leftover_metadata_snapshot(dm_home: Path) -> None:
    """A plugin killed inside a changed-block query leaves the pool's metadata snapshot held;
    the next start releases it."""
    drv = DevmapperDriver(dm_home, OPTIONS)
    dm.message(drv.pool, "reserve_metadata_snap")
    drv.release_pool()
    pool_files = dm_home / "loop"
    assert (pool_files / "metadata").exists()
    again = DevmapperDriver(dm_home, OPTIONS)
    try:
        assert held_metadata_root(again.pool) == "-"
        assert again.supports_block_metadata
        assert ("changed-block tracking", "thin pool metadata (thin_dump, thin_delta)") in again.status()
    finally:
        again.release_pool()
