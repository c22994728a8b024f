"""The CSI SnapshotMetadata service (csi.services.snapshot_metadata) over a real gRPC server
built with csi.services.listen.new_server (the one error seam), on a unix socket.

The host kernel has no device-mapper, so the plugin runs vfs (which keeps no block map:
FAILED_PRECONDITION, no capability) and, for the block maps, a driver stand-in answering
with what thin_dump / thin_delta said in the guest (tests/cbt/data). The real thin pool
path is tests/qemu/inguest/check_cbt.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.errors import FailedPrecondition, NotFound
from csi.graphdriver.devicemapper import thinmeta
from csi.graphdriver.driver import BlockMap
from csi.ids import new_layer_id
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.services.identity import IdentityService
from csi.services.listen import listen_unix, new_server
from csi.services.plugin import Plugin, PluginConfig
from csi.services.snapshot_metadata import DEFAULT_MAX_RESULTS, SnapshotMetadataService, pages
from csi.services.volume_ids import make_id
from csi.state.store import RecordState, SnapshotRecord

from .test_thinmeta import BLOCK, CAPACITY, DATA, IDS

C = grpc.StatusCode
NODE = "node-a"


class CannedBlockDriver:
    """The plugin's vfs driver, with block maps from the captured thin pool metadata."""

    supports_block_metadata = True

    def __init__(self, inner: Any, layers: dict[str, str]) -> None:
        self._inner, self._names = inner, layers  # layer id -> scenario name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def allocated_blocks(self, layer_id: str) -> BlockMap:
        found = thinmeta.parse_dump(io.BytesIO((DATA / "dump.xml").read_bytes()), IDS[self._names[layer_id]])
        return thinmeta.block_map(found, BLOCK, CAPACITY)

    def changed_blocks(self, base_id: str, layer_id: str) -> BlockMap:
        base, target = self._names[base_id], self._names[layer_id]
        if "lonely" in (base, target):
            raise FailedPrecondition(f"layers {base_id} and {layer_id} hold unrelated content")
        if "gone" in (base, target):
            raise NotFound(f"layer {layer_id} does not exist")
        found = thinmeta.parse_delta(io.BytesIO((DATA / f"delta-{base}-{target}.xml").read_bytes()))
        return thinmeta.block_map(found, BLOCK, CAPACITY)


class Harness:
    def __init__(self, root: Path) -> None:
        self.plugin = Plugin(PluginConfig(root=root / "root", node_id=NODE, driver="vfs"))
        self.vfs = self.plugin.driver
        self.layers = {name: new_layer_id("snap-") for name in ("s1", "s2", "s3", "lonely", "gone")}
        for name, layer in self.layers.items():
            self.plugin.store.add_snapshot(SnapshotRecord(layer=layer, name=f"vs-{name}", source_layer=new_layer_id("vol-"),
                                                          size=CAPACITY, state=RecordState.READY))
        self.server = new_server(2, "cbt-test")
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(self.plugin), self.server)
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(self.plugin), self.server)
        endpoint = listen_unix(self.server, root / "csi.sock")
        self.server.start()
        self.channel = grpc.insecure_channel(endpoint)
        self.meta = csi_pb2_grpc.SnapshotMetadataStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)

    def canned(self) -> None:
        self.plugin.driver = CannedBlockDriver(self.vfs, {v: k for k, v in self.layers.items()})  # type: ignore[assignment]

    def sid(self, name: str) -> str:
        return make_id(self.layers[name], NODE)

    def allocated(self, name: str, **kw: Any) -> list[pb.GetMetadataAllocatedResponse]:
        return list(self.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=self.sid(name), **kw)))

    def delta(self, base: str, target: str, **kw: Any) -> list[pb.GetMetadataDeltaResponse]:
        return list(self.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=self.sid(base), target_snapshot_id=self.sid(target), **kw)))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)
        self.plugin.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def offsets(responses: list[Any]) -> list[int]:
    return [m.byte_offset for r in responses for m in r.block_metadata]


def check_shape(responses: list[Any]) -> None:
    assert responses
    for r in responses:
        assert r.block_metadata_type == pb.FIXED_LENGTH
        assert r.volume_capacity_bytes == CAPACITY
        assert all(m.size_bytes == BLOCK for m in r.block_metadata)
    got = offsets(responses)
    assert got == sorted(set(got))


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code()


def test_allocated_lists_the_written_blocks(h: Harness) -> None:
    h.canned()
    for name, written in (("s1", [0, 5, 6, 7, 20]), ("s2", [0, 5, 6, 7, 30, 31]), ("s3", [0, 5, 6, 7, 20, 40])):
        got = h.allocated(name)
        check_shape(got)
        assert offsets(got) == [b * BLOCK for b in written]


def test_delta_lists_the_blocks_changed_between(h: Harness) -> None:
    h.canned()
    got = h.delta("s1", "s2")
    check_shape(got)
    assert offsets(got) == [b * BLOCK for b in (6, 20, 30, 31)]
    assert offsets(h.delta("s1", "s3")) == [40 * BLOCK]


def test_paging_and_resuming(h: Harness) -> None:
    h.canned()
    got = h.allocated("s1", max_results=2)
    assert [len(r.block_metadata) for r in got] == [2, 2, 1]
    # resume after the first page: from the next block; an unaligned offset rounds down
    assert offsets(h.allocated("s1", starting_offset=5 * BLOCK + BLOCK)) == [b * BLOCK for b in (6, 7, 20)]
    assert offsets(h.allocated("s1", starting_offset=6 * BLOCK + 100)) == [b * BLOCK for b in (6, 7, 20)]
    assert offsets(h.delta("s1", "s2", starting_offset=21 * BLOCK, max_results=1)) == [30 * BLOCK, 31 * BLOCK]
    # at the end: one empty response carrying the capacity; beyond it: OUT_OF_RANGE
    end = h.allocated("s1", starting_offset=CAPACITY)
    assert len(end) == 1 and not end[0].block_metadata and end[0].volume_capacity_bytes == CAPACITY
    assert code_of(lambda: h.allocated("s1", starting_offset=CAPACITY + 1)) == C.OUT_OF_RANGE
    assert code_of(lambda: h.delta("s1", "s2", starting_offset=CAPACITY + BLOCK)) == C.OUT_OF_RANGE


def test_pages_of_a_full_gibibyte() -> None:
    full = BlockMap(BLOCK, 1 << 30, ((0, 1 << 30),))
    got = list(pages(full, 0, 0, pb.GetMetadataAllocatedResponse))
    assert [len(r.block_metadata) for r in got] == [DEFAULT_MAX_RESULTS] * ((1 << 30) // BLOCK // DEFAULT_MAX_RESULTS)
    assert len(list(pages(full, 0, 10**9, pb.GetMetadataAllocatedResponse))) == 1  # capped at MAX_RESULTS
    resumed = list(pages(full, (1 << 30) - BLOCK, 0, pb.GetMetadataAllocatedResponse))
    assert [m.byte_offset for r in resumed for m in r.block_metadata] == [(1 << 30) - BLOCK]


def test_errors_follow_the_spec_tables(h: Harness) -> None:
    h.canned()
    other = make_id(h.layers["s1"], "node-b")
    cases = [
        (lambda: list(h.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest())), C.INVALID_ARGUMENT),
        (lambda: h.allocated("s1", max_results=-1), C.INVALID_ARGUMENT),
        (lambda: h.allocated("s1", starting_offset=-1), C.INVALID_ARGUMENT),
        (lambda: list(h.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id="../etc"))), C.NOT_FOUND),
        (lambda: list(h.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=other))), C.NOT_FOUND),
        (lambda: list(h.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
            snapshot_id=make_id(new_layer_id("snap-"), NODE)))), C.NOT_FOUND),
        (lambda: list(h.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(target_snapshot_id=h.sid("s2")))),
         C.INVALID_ARGUMENT),
        (lambda: list(h.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(base_snapshot_id=h.sid("s1")))),
         C.INVALID_ARGUMENT),
        (lambda: list(h.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id="nope", target_snapshot_id=h.sid("s2")))), C.NOT_FOUND),
        (lambda: list(h.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=other, target_snapshot_id=h.sid("s2")))), C.FAILED_PRECONDITION),
        (lambda: h.delta("s1", "lonely"), C.FAILED_PRECONDITION),
        (lambda: h.delta("s1", "gone"), C.NOT_FOUND),
        (lambda: h.delta("s1", "s2", max_results=-5), C.INVALID_ARGUMENT),
    ]
    for call, want in cases:
        assert code_of(call) == want


def test_secrets_never_needed_and_accepted(h: Harness) -> None:
    h.canned()
    got = list(h.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=h.sid("s1"),
                                                                           secrets={"k": "v"})))
    assert offsets(got)


def test_driver_without_block_maps(h: Harness) -> None:
    """vfs keeps no block map: FAILED_PRECONDITION naming the driver (the client falls back
    to a full backup), and Identity does not advertise the service."""
    with pytest.raises(grpc.RpcError) as exc:
        h.allocated("s1")
    assert exc.value.code() == C.FAILED_PRECONDITION and "vfs" in exc.value.details()
    assert code_of(lambda: h.delta("s1", "s2")) == C.FAILED_PRECONDITION
    service = pb.PluginCapability.Service
    caps = {c.service.type for c in h.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities}
    assert service.SNAPSHOT_METADATA_SERVICE not in caps
    h.canned()
    caps = {c.service.type for c in h.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities}
    assert service.SNAPSHOT_METADATA_SERVICE in caps
