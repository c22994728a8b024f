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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import grpc

from csi.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unsupported
from csi.graphdriver.driver import BlockMap
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.plugin import Plugin
from csi.services.volume_ids import SNAPSHOT_PREFIX, parse_id, parse_local
from csi.state.store import RecordState

__all__ = ["DEFAULT_MAX_RESULTS", "MAX_RESULTS", "SnapshotMetadataService", "pages"]

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
