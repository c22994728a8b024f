"""CSI SnapshotMetadata service (changed-block tracking) on the node plugin.

``GetMetadataAllocated(snapshot_id)`` lists the blocks of a snapshot that hold data,
``GetMetadataDelta(base_snapshot_id, target_snapshot_id)`` the blocks whose content
changed between two snapshots of one volume (written, overwritten or discarded since the
base). Both come from the driver's block map (:meth:`Driver.allocated_blocks`,
:meth:`Driver.changed_blocks`: a thin pool's own metadata on devicemapper), never from a
read of the data.

Answers (CSI v1.12, SnapshotMetadata): a stream of responses, every one with
``block_metadata_type = FIXED_LENGTH``, the same ``volume_capacity_bytes`` (the
snapshot's device size; for a delta the target's), and ascending, non-overlapping
``BlockMetadata`` of exactly the driver's block size (the pool's block). A response holds
at most ``max_results`` entries (0: :data:`DEFAULT_MAX_RESULTS`; never more than
:data:`MAX_RESULTS`). ``starting_offset`` resumes an interrupted call: it is rounded down to
its block and the list starts there. A call with nothing to list sends one response with
no entries (so the client still learns the capacity).

Errors (the spec's tables): missing ID or a negative offset / max_results →
INVALID_ARGUMENT; a snapshot strata did not issue, another node's, or gone → NOT_FOUND (a
base on another node than the target: FAILED_PRECONDITION, nothing to compare on one
pool); ``starting_offset`` beyond the capacity → OUT_OF_RANGE; changed-block tracking not
available for these snapshots (a filesystem volume's snapshot, a driver without block
maps, unrelated or reversed snapshots) → FAILED_PRECONDITION, so the client falls back to
a full backup. The block map is computed before the first response; the stream itself
holds no lock, so a snapshot deleted while its map streams does not disturb the call.

Across nodes: Kubernetes' external-snapshot-metadata sidecar has one CSI address per
driver, so it talks to ``strata controller``, whose :class:`RelayingSnapshotMetadata`
sends each call to the node that owns the (target) snapshot over the node-to-node channel
(a :class:`csi.peers.dial.PeerDialer`) and streams the node's answer back as it comes. A
node that cannot be reached before the first response is looked up again once, then
UNAVAILABLE naming it; any status the node answers (before or mid-stream) is relayed as it
is (:class:`csi.errors.Relayed`), naming the node. The node serves the calls on its peer
listener through :func:`peer_service`, for strata's own accounts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from csi.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Relayed, Unavailable, Unsupported
from csi.graphdriver.driver import BlockMap
from csi.peers.dial import PeerDialer
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.plugin import Plugin
from csi.services.volume_ids import SNAPSHOT_PREFIX, owner_node, parse_id, parse_local
from csi.state.store import RecordState

__all__ = ["DEFAULT_MAX_RESULTS", "MAX_RESULTS", "SNAPSHOT_METADATA_SERVICE", "RelayingSnapshotMetadata",
           "SnapshotMetadataService", "pages", "peer_service", "relay_stream"]

log = logging.getLogger("strata.snapshot_metadata")
SNAPSHOT_METADATA_SERVICE = "csi.v1.SnapshotMetadata"

DEFAULT_MAX_RESULTS = 1024
MAX_RESULTS = 16384  # ~200 KiB per response, well under gRPC's 4 MiB message limit

Response = TypeVar("Response", csi_pb2.GetMetadataAllocatedResponse, csi_pb2.GetMetadataDeltaResponse)


def _check_paging(starting_offset: int, max_results: int) -> None:
    if starting_offset < 0:
        raise InvalidArgument(f"starting_offset must not be negative, got {starting_offset}")
    if max_results < 0:
        raise InvalidArgument(f"max_results must not be negative, got {max_results}")


def blocks_from(found: BlockMap, starting_offset: int) -> Iterator[int]:
    """Offsets of the fixed-length blocks of ``found`` at or after ``starting_offset``'s block."""
    bs = found.block_size
    first = starting_offset - starting_offset % bs
    for offset, length in found.extents:
        end = offset + length
        if end <= first:
            continue
        yield from range(max(offset, first), end, bs)


def pages(found: BlockMap, starting_offset: int, max_results: int,
          response: type[Response]) -> Iterator[Response]:
    """The responses for ``found`` (see the module docstring); raises OutOfRange before the
    first one when ``starting_offset`` is beyond the capacity."""
    if starting_offset > found.capacity_bytes:
        raise OutOfRange(f"starting_offset {starting_offset} is beyond the volume's {found.capacity_bytes} bytes")
    per = min(max_results or DEFAULT_MAX_RESULTS, MAX_RESULTS)
    batch: list[csi_pb2.BlockMetadata] = []
    sent = False
    for offset in blocks_from(found, starting_offset):
        batch.append(csi_pb2.BlockMetadata(byte_offset=offset, size_bytes=found.block_size))
        if len(batch) == per:
            yield response(block_metadata_type=csi_pb2.FIXED_LENGTH, volume_capacity_bytes=found.capacity_bytes,
                           block_metadata=batch)
            batch, sent = [], True
    if batch or not sent:
        yield response(block_metadata_type=csi_pb2.FIXED_LENGTH, volume_capacity_bytes=found.capacity_bytes,
                       block_metadata=batch)


class SnapshotMetadataService(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def _snapshot_layer(self, snapshot_id: str, field: str) -> str:
        if not snapshot_id:
            raise InvalidArgument(f"{field} is required")
        layer = parse_local(snapshot_id, self.plugin.node_id, SNAPSHOT_PREFIX)
        record = self.plugin.store.snapshot(layer)
        if record is None or record.state is not RecordState.READY:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return layer

    def _no_tracking(self, exc: Unsupported) -> FailedPrecondition:
        return FailedPrecondition(f"changed-block tracking is not available: {exc}")

    def GetMetadataAllocated(self, request: csi_pb2.GetMetadataAllocatedRequest,
                             context: grpc.ServicerContext) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        layer = self._snapshot_layer(request.snapshot_id, "snapshot_id")
        _check_paging(request.starting_offset, request.max_results)
        try:
            found = self.plugin.driver.allocated_blocks(layer)
        except Unsupported as exc:
            raise self._no_tracking(exc) from exc
        except NotFound as exc:
            raise NotFound(f"snapshot {request.snapshot_id} does not exist") from exc
        yield from pages(found, request.starting_offset, request.max_results, csi_pb2.GetMetadataAllocatedResponse)

    def GetMetadataDelta(self, request: csi_pb2.GetMetadataDeltaRequest,
                         context: grpc.ServicerContext) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        if not request.base_snapshot_id:
            raise InvalidArgument("base_snapshot_id is required")
        target = self._snapshot_layer(request.target_snapshot_id, "target_snapshot_id")
        _base_layer, base_node = parse_id(request.base_snapshot_id)
        if base_node != self.plugin.node_id:
            raise FailedPrecondition(f"base snapshot {request.base_snapshot_id} lives on node {base_node}, target "
                                     f"{request.target_snapshot_id} on {self.plugin.node_id}: blocks are compared "
                                     "within one node's storage only")
        base = self._snapshot_layer(request.base_snapshot_id, "base_snapshot_id")
        _check_paging(request.starting_offset, request.max_results)
        try:
            found = self.plugin.driver.changed_blocks(base, target)
        except Unsupported as exc:
            raise self._no_tracking(exc) from exc
        except NotFound as exc:
            raise NotFound(f"snapshot {request.base_snapshot_id} or {request.target_snapshot_id} "
                           "does not exist") from exc
        yield from pages(found, request.starting_offset, request.max_results, csi_pb2.GetMetadataDeltaResponse)


def peer_service(plugin: Plugin) -> tuple[str, Callable[[grpc.Server], None]]:
    """``(method prefix, add(server))`` for the node's peer listener
    (:func:`csi.services.export.start_tcp_export`): this node's SnapshotMetadata service."""

    def add(server: grpc.Server) -> None:
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(plugin), server)

    return f"/{SNAPSHOT_METADATA_SERVICE}/", add


def relay_stream(dialer: PeerDialer, node_id: str, call: Callable[[grpc.Channel], Iterator[Any]], *,
                 retries: int = 1) -> Iterator[Any]:
    """The responses of the server-streaming ``call(channel)`` on ``node_id``, as they come.
    UNAVAILABLE before the first response: the node is forgotten and dialed again (``retries``
    times), then :class:`Unavailable` naming it; any other status, or any status once
    responses flowed, is :class:`Relayed` naming the node."""
    attempt = 0
    while True:
        channel = dialer.dial(node_id)  # Unavailable naming the node when it has no address
        received = False
        try:
            for response in call(channel):
                received = True
                yield response
            return
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = (exc.details() if hasattr(exc, "details") else "") or ""
            if code != grpc.StatusCode.UNAVAILABLE or received:
                raise Relayed(code.name, f"node {node_id}: {details}") from exc
            dialer.forget(node_id)
            if attempt >= retries:
                raise Unavailable(f"node {node_id} cannot be reached: {details}") from exc
            attempt += 1
            log.info("node %s unreachable (%s); looking its address up again", node_id, details)


class RelayingSnapshotMetadata(csi_pb2_grpc.SnapshotMetadataServicer):
    """SnapshotMetadata of ``strata controller``: each call streamed from the node that owns
    the snapshot (the target's owner for a delta; a base elsewhere is that node's
    FAILED_PRECONDITION). ``timeout``: seconds a whole stream may take."""

    def __init__(self, dialer: PeerDialer, timeout: float = 600.0) -> None:
        self._dialer, self._timeout = dialer, timeout

    def GetMetadataAllocated(self, request: csi_pb2.GetMetadataAllocatedRequest,  # noqa: N802
                             context: grpc.ServicerContext) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        node = owner_node(request.snapshot_id)  # NotFound when the ID is not strata's
        yield from relay_stream(self._dialer, node, lambda channel: csi_pb2_grpc.SnapshotMetadataStub(
            channel).GetMetadataAllocated(request, timeout=self._timeout))

    def GetMetadataDelta(self, request: csi_pb2.GetMetadataDeltaRequest,  # noqa: N802
                         context: grpc.ServicerContext) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        if not request.target_snapshot_id:
            raise InvalidArgument("target_snapshot_id is required")
        node = owner_node(request.target_snapshot_id)
        yield from relay_stream(self._dialer, node, lambda channel: csi_pb2_grpc.SnapshotMetadataStub(
            channel).GetMetadataDelta(request, timeout=self._timeout))
