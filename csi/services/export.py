"""The Diff export service (``strata.export.v1.DiffExport``, ``csi/proto/export.proto``):
snapshots as chains of OCI layer diffs, for backup sidecars, backup tools and other nodes.

RPCs (all through the one error seam, :mod:`csi.services.status`)::

    GetChain(snapshot)            the visible frozen ancestors and the snapshot, oldest first:
                                  id, parent, diff_size, digest (diff_id), tar size, ChainID,
                                  created, origin (the volume it was frozen from)
    Changes(snapshot, base)       stream of (path, added|modified|deleted), batched
    DiffSize(snapshot, base)      driver.diff_size
    ExportDiff(snapshot, base,    stream of ~1 MiB chunks of the OCI layer tar of what snapshot
      starting_offset, compr.)    adds to base (or to nothing), zstd on request; the last
                                  message has the diff_id, the blob digest and both sizes
    OpenExport(as ExportDiff)     the same stream on the node's bulk lane (csi.peers.bulk): a
                                  one-time ticket and the lane's port (TCP listener only)
    ImportDiff(header, chunks…)   a new frozen layer oci-<ChainID>, verified before it exists

Contract:

* **Naming.** ``snapshot`` is a CSI snapshot handle (``snap-<hex>@<node>``, resolved with
  :mod:`csi.services.volume_ids`; another node's handle is NOT_FOUND here, a volume's handle
  INVALID_ARGUMENT) or a VolumeSnapshot ``namespace/name`` (resolved through the API by
  :class:`csi.peers.snapshots.SnapshotResolver`); on the unix socket a raw frozen layer ID
  (as GetChain lists) is accepted too. ``base`` is "" (everything), a snapshot handle or a
  GetChain ID of either a *visible ancestor* of the snapshot or a *sibling*: a visible frozen
  layer with the snapshot's ``origin`` (a snapshot of the same volume) and an earlier
  ``created`` — on vfs, btrfs and devicemapper two snapshots of one volume both have the
  volume's parent as parent, and the daily backup of the second builds on the first's
  (``driver.diff`` compares any two layers: the naive differ walks both trees, overlay falls
  back to it for a base that is not the parent). Any other base (another volume's snapshot,
  a newer snapshot or a descendant, the snapshot itself) is **FAILED_PRECONDITION** — the
  request is well formed and both objects exist, but the pair is not offered: what CSI's
  SnapshotMetadata and backup tools treat as "fall back to a full export"; a base that does
  not exist (or was deleted: a hidden layer) is NOT_FOUND. GetChain reports each layer's
  ``origin`` (the CSI volume handle for a CSI volume) so a client can find such a sibling.
  **Access**: only the named snapshot is authorized (on TCP a VolumeSnapshot the caller may
  ``get``); the base is never checked on its own. That is sound because a base is an
  ancestor (part of the snapshot's own content history) or a snapshot *of the same volume*
  — the same-origin rule is what keeps a sibling base from widening access to another
  volume's data.
* **Digests are cached.** A diff_id costs a walk of the data, so it is remembered in the
  export cache (:class:`csi.backup.ExportIndex`, shared with ``strata backup``, keyed by layer,
  base and the layer's creation time): GetChain computes each missing one once, every complete
  ExportDiff records what it streamed, ImportDiff records what it verified.
* **Determinism and resume.** For a given pair the tar is the driver's diff, and the blob is
  made by feeding it to zstd (level 3, one thread) in fixed 1 MiB pieces, so the bytes are the
  same on every call; ``starting_offset`` regenerates the stream and skips that many blob bytes
  (OUT_OF_RANGE, after the stream, when it is past the end). Digests and sizes in the summary
  are always of the whole blob, so a resumed client verifies what it assembled.
* **Import.** Header first (parent, expected diff_id, media type tar / +zstd / +gzip, optional
  blob digest), data after. The layer is named by its ChainID (parent's ChainID + diff_id, as
  :mod:`csi.backup.index` names restored layers), so a layer this node already has is answered
  (``existed``, once the client's stream ended) and nothing is applied; a *header-only* call
  is a cheap question — ``existed``, or NOT_FOUND when the layer is missing. Otherwise, as
  :mod:`csi.backup.restore` does:
  ``create(ocitmp-…, parent)`` (a parentless one of the header's ``capacity_bytes``), ``apply_diff`` of the (decompressed) stream while hashing, drain,
  compare both digests, ``freeze(tmp, oci-<ChainID>)``, ``remove(tmp)``; any failure removes
  the temporary layer (DATA_LOSS on a digest mismatch), a kill -9 leaves an ``ocitmp-`` layer
  that :func:`csi.backup.sweep_temporaries` removes at start-up. The final ID never exists
  unverified.
* **Who may call** is an :class:`Access` policy per listener: :class:`LocalAccess` on the
  owner-only unix socket (everything; the socket's mode is the check), :class:`KubernetesAccess`
  on TCP (behind :class:`csi.peers.auth.TokenAuthInterceptor`): the snapshot must be named as a
  VolumeSnapshot and the caller needs ``get`` on it (SubjectAccessReview); ImportDiff only for
  the ServiceAccounts listed as importers (strata's own).

Wiring (``strata serve``): :func:`start_unix_export` on the CSI server's unix socket sibling
and, with ``--peer-listen``, the node's one TCP listener :func:`start_tcp_export`, shared with
the node-to-node channel (see their docstrings; :class:`ChannelAccess` is its policy).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import grpc

from csi.backup.digests import Digests
from csi.backup.export import export_chain, older_sibling
from csi.backup.index import ExportIndex, ExportRecord, IMPORTED_PREFIX, imported_layer_id, temp_layer_id
from csi.backup.media import (LAYER_TAR, LAYER_TAR_GZIP, LAYER_TAR_ZSTD, LAYER_TYPES, HashingReader, chain_id,
                              check_digest)
from csi.backup.restore import create_import_layer
from csi.errors import (AlreadyExists, DigestMismatch, FailedPrecondition, InvalidArgument, NotFound, OutOfRange,
                        PermissionDenied, Unauthenticated)
from csi.graphdriver.driver import ChangeKind, Driver, Layer
from csi.ids import is_layer_id
from csi.peers.auth import (AccessReviewer, Authorizer, TokenAuthInterceptor, TokenReviewer, allow_service_accounts,
                             by_method, caller_of, preload_client)
from csi.peers.snapshots import GROUP as SNAPSHOT_GROUP, SNAPSHOTS, SnapshotResolver, check_object_name
from csi.host.pipestream import ReadStream
from csi.peers.bulk import Payload, TicketBook, Trailer
from csi.peers.tls import TlsFiles, listen_tls
from csi.proto import export_pb2, export_pb2_grpc
from csi.services.listen import listen_unix, new_server
from csi.services.readahead import read_ahead
from csi.services.rpclog import Observer
from csi.services.volume_ids import SNAPSHOT_PREFIX, VOLUME_PREFIX, make_id, parse_id

DIFF_EXPORT_SERVICE = "strata.export.v1.DiffExport"  # the full service name, as in method paths
log = logging.getLogger("strata.export")

CHUNK = 1 << 20
READ_AHEAD = 4  # chunks read and hashed ahead of the one being sent
CHANGES_PER_MESSAGE = 1000
ZSTD_LEVEL = 3
MEDIA = {export_pb2.NONE: LAYER_TAR, export_pb2.ZSTD: LAYER_TAR_ZSTD}
KINDS = {ChangeKind.ADDED: export_pb2.Change.ADDED, ChangeKind.MODIFIED: export_pb2.Change.MODIFIED,
         ChangeKind.DELETED: export_pb2.Change.DELETED}


@dataclass(frozen=True)
class ChainEntry:
    layer: Layer
    id: str  # as the API shows it: the snapshot handle of a snap- layer, else the layer ID
    base: Layer | None
    base_id: str
    size: int
    diff_id: str
    tar_size: int
    chain_id: str


def _read_full(stream: IO[bytes], n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Requests(ReadStream):
    """The data of an ImportDiff request stream as a file object."""

    def __init__(self, messages: Iterator[Any]) -> None:
        self._messages = messages
        self._buffer = b""
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        while not self._buffer:
            message = next(self._messages, None)
            if message is None:
                return b""
            if message.HasField("header"):
                raise InvalidArgument("ImportDiff: only the first message may carry a header")
            self._buffer = message.data
        if n is None or n < 0:
            n = len(self._buffer)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        self._hash.update(data)
        self.count += len(data)
        return data

    def close(self) -> None:
        pass

    def at_end(self) -> bool:
        """Whether the stream has no (more) data, without consuming any."""
        while not self._buffer:
            message = next(self._messages, None)
            if message is None:
                return True
            if message.HasField("header"):
                raise InvalidArgument("ImportDiff: only the first message may carry a header")
            self._buffer = message.data
        return False

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class ExportBackend:
    """The service's work on one node's driver (no gRPC in here)."""

    def __init__(self, driver: Driver, node_id: str, index: ExportIndex | None = None,
                 digests: Digests | None = None) -> None:
        self.driver = driver
        self.node_id = node_id
        self.index = index
        self.digests = digests if digests is not None else Digests(driver, index)

    # ------------------------------------------------------------------ naming

    def public_id(self, layer_id: str) -> str:
        return make_id(layer_id, self.node_id) if layer_id.startswith(SNAPSHOT_PREFIX) else layer_id

    def _layer_of(self, value: str, what: str, allow_layer_ids: bool) -> str:
        try:
            layer_id, node = parse_id(value)
        except NotFound:
            if allow_layer_ids and is_layer_id(value):
                return value
            raise
        if node != self.node_id:
            raise NotFound(f"{what} {value} is owned by node {node}, not by this node ({self.node_id})")
        if layer_id.startswith(VOLUME_PREFIX):
            raise InvalidArgument(f"{what} {value} is a volume: export a snapshot of it")
        return layer_id

    def snapshot(self, value: str, allow_layer_ids: bool = False) -> Layer:
        """The frozen, visible layer a request names."""
        if not value:
            raise InvalidArgument("snapshot is required (snapshot_id, or namespace and name)")
        layer_id = self._layer_of(value, "snapshot", allow_layer_ids)
        if not self.driver.exists(layer_id):
            raise NotFound(f"snapshot {value} does not exist on node {self.node_id}")
        layer = self.driver.layer(layer_id)
        if not layer.frozen:
            raise InvalidArgument(f"{value} is a writable layer: export a snapshot (a frozen layer)")
        return layer

    def base(self, snapshot: Layer, value: str) -> Layer | None:
        """The base ``value`` names: a visible ancestor of ``snapshot``, or an older frozen
        snapshot of the same volume (see the module docstring for the codes)."""
        if not value:
            return None
        layer_id = self._layer_of(value, "base", True)
        if not self.driver.exists(layer_id):
            raise NotFound(f"base {value} does not exist on node {self.node_id} (deleted snapshots cannot be bases)")
        ancestors = [l.id for l in self.driver.chain(snapshot.id)[1:]]
        base = self.driver.layer(layer_id)
        if layer_id in ancestors or older_sibling(snapshot, base):
            return base
        raise FailedPrecondition(f"base {value} is neither an ancestor of snapshot {self.public_id(snapshot.id)} "
                                 "nor an older snapshot of the same volume: the pair is not offered; export "
                                 "without a base")

    def public_origin(self, layer: Layer) -> str:
        """GetChain's ``origin``: the CSI volume handle of a ``vol-`` layer, else the layer ID."""
        if not layer.origin:
            return ""
        try:
            return make_id(layer.origin, self.node_id)
        except InvalidArgument:  # not a CSI volume's layer (a bare driver's writable layer)
            return layer.origin

    # ------------------------------------------------------------------ the RPCs' work

    def chain(self, snapshot: Layer) -> list[ChainEntry]:
        out: list[ChainEntry] = []
        ids: list[str] = []
        for layer, base_id in export_chain(self.driver, snapshot.id):
            base = self.driver.layer(base_id) if base_id else None
            diff_id, tar_size = self.digests.diff_id(layer, base)
            ids.append(diff_id)
            # diff_size is the tar's length, known with the diff_id (cached): a frozen pair's diff is fixed
            out.append(ChainEntry(layer, self.public_id(layer.id), base, self.public_id(base_id) if base_id else "",
                                  tar_size, diff_id, tar_size, chain_id(ids)))
        return out

    def chain_id_of(self, layer: Layer) -> str:
        if layer.id.startswith(IMPORTED_PREFIX) and len(layer.id) == len(IMPORTED_PREFIX) + 64:
            return "sha256:" + layer.id[len(IMPORTED_PREFIX):]
        return self.chain(layer)[-1].chain_id

    def changes(self, snapshot: Layer, base: Layer | None) -> Iterator[export_pb2.ChangesResponse]:
        batch: list[export_pb2.Change] = []
        for change in self.driver.changes(snapshot.id, base.id if base else None):
            batch.append(export_pb2.Change(path=change.path, kind=KINDS[ChangeKind(change.kind)]))
            if len(batch) >= CHANGES_PER_MESSAGE:
                yield export_pb2.ChangesResponse(changes=batch)
                batch = []
        if batch:
            yield export_pb2.ChangesResponse(changes=batch)

    def blob(self, snapshot: Layer, base: Layer | None, compression: int,
             offset: int) -> Iterator[tuple[int, bytes, int, int] | export_pb2.ExportSummary]:
        """The pair's blob from ``offset``: ``(at, data, tar bytes done, tar bytes total)`` per
        ~CHUNK, then the summary (see "Determinism and resume" in the module docstring). An
        uncompressed blob whose diff_id is cached is not hashed again: the receiver hashes
        what it gets and compares it with the summary."""
        if compression not in MEDIA:
            raise InvalidArgument(f"compression {compression} is not NONE or ZSTD")
        media_type = MEDIA[compression]
        rec = self.digests.cached(snapshot, base)
        total = rec.size if rec is not None and rec.size >= 0 else 0
        known = rec.diff_id if total and media_type == LAYER_TAR else None
        compressor = None
        if media_type == LAYER_TAR_ZSTD:
            import zstandard

            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).compressobj()
        tar_hash = None if known else hashlib.sha256()
        blob_hash = tar_hash if compressor is None else hashlib.sha256()  # an uncompressed blob is the tar
        done = position = 0
        pending: list[bytes] = []
        pending_len = 0
        pending_at = offset
        raw = self.driver.diff(snapshot.id, base.id if base else None)

        def pieces() -> Iterator[tuple[int, bytes]]:
            """(tar bytes, blob bytes) per CHUNK of the tar, hashed (and compressed)."""
            last = False
            while not last:
                piece = _read_full(raw, CHUNK)
                last = len(piece) < CHUNK
                if tar_hash is not None:
                    tar_hash.update(piece)
                if compressor is None:
                    yield len(piece), piece
                    continue
                out = compressor.compress(piece)
                if last:
                    out += compressor.flush()
                assert blob_hash is not None
                blob_hash.update(out)
                yield len(piece), out

        try:
            ahead = read_ahead(pieces(), READ_AHEAD, f"export-{snapshot.id}")
            try:
                for n, out in ahead:
                    done += n
                    start, position = position, position + len(out)
                    if position <= offset:
                        continue
                    view = out[max(0, offset - start):]
                    pending.append(view)
                    pending_len += len(view)
                    while pending_len >= CHUNK:
                        data = b"".join(pending)
                        chunk, rest = data[:CHUNK], data[CHUNK:]
                        yield pending_at, chunk, done, total
                        pending_at += len(chunk)
                        pending, pending_len = ([rest], len(rest)) if rest else ([], 0)
            finally:
                ahead.close()  # type: ignore[attr-defined]  # the reader thread ends before raw closes
            if pending_len:
                yield pending_at, b"".join(pending), done, total
                pending_at += pending_len
        finally:
            raw.close()
        if offset > position:
            raise OutOfRange(f"starting_offset {offset} is past the end of the stream ({position} bytes)")
        if known is not None:
            if done != total:
                log.warning("layer %s: its diff is %d bytes, the cache said %d", snapshot.id, done, total)
            diff_id = digest = known
        else:
            assert tar_hash is not None and blob_hash is not None
            diff_id, digest = "sha256:" + tar_hash.hexdigest(), "sha256:" + blob_hash.hexdigest()
            self.digests.remember(snapshot, base, media_type, digest, diff_id, position, done)
        yield export_pb2.ExportSummary(media_type=media_type, diff_id=diff_id, uncompressed_size=done,
                                       digest=digest, size=position, bytes_sent=pending_at - offset)

    def export(self, snapshot: Layer, base: Layer | None, compression: int,
               offset: int) -> Iterator[export_pb2.ExportDiffResponse]:
        """ExportDiff's messages: :meth:`blob` as chunks, the summary last."""
        for item in self.blob(snapshot, base, compression, offset):
            if isinstance(item, export_pb2.ExportSummary):
                yield export_pb2.ExportDiffResponse(offset=item.size, bytes_done=item.uncompressed_size,
                                                    bytes_total=item.uncompressed_size, summary=item)
            else:
                at, data, done, total = item
                yield export_pb2.ExportDiffResponse(data=data, offset=at, bytes_done=done, bytes_total=total)

    def bulk(self, snapshot: Layer, base: Layer | None, compression: int, offset: int) -> Payload:
        """The bulk lane's payload for the same stream (:mod:`csi.peers.bulk`): the chunks'
        data, then the serialized summary as the trailer."""
        def payload() -> Iterator[bytes | Trailer]:
            for item in self.blob(snapshot, base, compression, offset):
                yield Trailer(item.SerializeToString()) if isinstance(item, export_pb2.ExportSummary) else item[1]
        return payload

    def parent_for_import(self, value: str) -> Layer | None:
        if not value:
            return None
        return self.snapshot(value, allow_layer_ids=True)

    def import_diff(self, header: export_pb2.ImportHeader, data: _Requests) -> export_pb2.ImportDiffResponse:
        diff_id = check_digest(header.diff_id, "header.diff_id")
        expected_blob = check_digest(header.digest, "header.digest") if header.digest else None
        media_type = header.media_type or LAYER_TAR
        if media_type not in LAYER_TYPES:
            raise InvalidArgument(f"media type {media_type!r} is not one of {', '.join(LAYER_TYPES)}")
        parent = self.parent_for_import(header.parent)
        if parent is not None and parent.block:
            raise InvalidArgument(f"parent {header.parent} is a raw block layer: layer tars cannot be applied to it")
        new_chain = chain_id([self.chain_id_of(parent), diff_id]) if parent is not None else diff_id
        final = imported_layer_id(new_chain)
        if self.driver.exists(final):
            # read what the client still sends: answering a client stream before its end makes
            # some clients see the call fail (a broken pipe) instead of this answer
            data.drain()
            return export_pb2.ImportDiffResponse(layer_id=final, chain_id=new_chain, diff_id=diff_id, existed=True)
        if data.at_end():  # a header-only call asks whether the layer is here
            raise NotFound(f"layer {final} (diff_id {diff_id} on {header.parent or 'nothing'}) is not on node "
                           f"{self.node_id}: send its data")
        tmp = temp_layer_id()
        parent_id = parent.id if parent else None
        create_import_layer(self.driver, tmp, parent_id, header.capacity_bytes)
        try:
            stream: IO[bytes] = data  # type: ignore[assignment]
            if media_type == LAYER_TAR_ZSTD:
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(data, closefd=False)  # type: ignore[assignment]
            elif media_type == LAYER_TAR_GZIP:
                stream = gzip.GzipFile(fileobj=data, mode="rb")  # type: ignore[assignment]
            tar = HashingReader(stream)
            self.driver.apply_diff(tmp, parent_id, tar)  # type: ignore[arg-type]
            tar.drain()
            data.drain()
            if tar.digest() != diff_id:
                raise DigestMismatch(f"ImportDiff: the layer hashes to {tar.digest()}, the header says {diff_id}")
            if expected_blob is not None and data.digest() != expected_blob:
                raise DigestMismatch(f"ImportDiff: the bytes received hash to {data.digest()}, "
                                     f"the header says {expected_blob}")
            try:
                self.driver.freeze(tmp, final)
            except AlreadyExists:
                if not self.driver.exists(final):
                    raise
        finally:
            try:
                self.driver.remove(tmp)
            except Exception:  # noqa: BLE001 - the start-up sweep removes it
                log.warning("could not remove the import layer %s", tmp, exc_info=True)
        layer = self.driver.layer(final)
        self.digests.remember(layer, parent, media_type, data.digest(), diff_id, data.count, tar.count)
        log.info("imported layer %s (diff_id %s, %d bytes) on %s", final, diff_id, tar.count, parent_id or "nothing")
        return export_pb2.ImportDiffResponse(layer_id=final, chain_id=new_chain, diff_id=diff_id, size=tar.count)


# ---------------------------------------------------------------------- access policies


class Access(Protocol):
    """Who may do what on one listener."""

    allow_layer_ids: bool

    def snapshot_id(self, context: grpc.ServicerContext, ref: export_pb2.SnapshotRef) -> str: ...

    def check_import(self, context: grpc.ServicerContext) -> None: ...


class LocalAccess:
    """The owner-only unix socket: every call is allowed (the socket's mode is the check)."""

    allow_layer_ids = True

    def __init__(self, resolver: SnapshotResolver | None = None) -> None:
        self.resolver = resolver

    def snapshot_id(self, context: grpc.ServicerContext, ref: export_pb2.SnapshotRef) -> str:
        if ref.snapshot_id:
            if ref.namespace or ref.name:
                raise InvalidArgument("name the snapshot by snapshot_id or by namespace/name, not both")
            return ref.snapshot_id
        if not (ref.namespace or ref.name):
            raise InvalidArgument("snapshot is required (snapshot_id, or namespace and name)")
        if self.resolver is None:
            raise FailedPrecondition("this plugin has no Kubernetes API access: name the snapshot by snapshot_id")
        return self.resolver.handle(ref.namespace, ref.name)

    def check_import(self, context: grpc.ServicerContext) -> None:
        return None


class KubernetesAccess:
    """The TCP listener: callers authenticated by :class:`~csi.peers.auth.TokenAuthInterceptor`;
    ``get`` on the named VolumeSnapshot required; ImportDiff for ``importers`` only."""

    allow_layer_ids = False

    def __init__(self, resolver: SnapshotResolver, reviewer: AccessReviewer, importers: Iterable[str] = ()) -> None:
        self.resolver = resolver
        self.reviewer = reviewer
        self.importers = {tuple(a.split("/", 1)) for a in importers}

    def snapshot_id(self, context: grpc.ServicerContext, ref: export_pb2.SnapshotRef) -> str:
        caller = caller_of(context)
        if caller is None:
            raise Unauthenticated("no authenticated caller on this listener")
        if ref.snapshot_id or not (ref.namespace and ref.name):
            raise InvalidArgument("over TCP, name the snapshot as a VolumeSnapshot: namespace and name "
                                  "(a bare snapshot_id cannot be authorized)")
        check_object_name(ref.namespace, ref.name)
        self.reviewer.require(caller, verb="get", group=SNAPSHOT_GROUP, resource=SNAPSHOTS,
                              namespace=ref.namespace, name=ref.name)
        handle = self.resolver.handle(ref.namespace, ref.name)
        log.info("%s may read VolumeSnapshot %s/%s (%s)", caller.username, ref.namespace, ref.name, handle)
        return handle

    def check_import(self, context: grpc.ServicerContext) -> None:
        caller = caller_of(context)
        if caller is None:
            raise Unauthenticated("no authenticated caller on this listener")
        if caller.service_account not in self.importers:
            raise PermissionDenied(f"{caller.username} may not import layers")


# ---------------------------------------------------------------------- the servicer


@dataclass(frozen=True)
class BulkLane:
    """This node's bulk lane (:class:`csi.peers.bulk.BulkServer`): where OpenExport's tickets
    are kept and the port they are redeemed on."""

    tickets: TicketBook
    port: int


class DiffExportService(export_pb2_grpc.DiffExportServicer):
    def __init__(self, backend: ExportBackend, access: Access, lane: BulkLane | None = None) -> None:
        self.backend = backend
        self.access = access
        self.lane = lane

    def _snapshot(self, context: grpc.ServicerContext, ref: export_pb2.SnapshotRef) -> Layer:
        return self.backend.snapshot(self.access.snapshot_id(context, ref), self.access.allow_layer_ids)

    def GetChain(self, request: export_pb2.GetChainRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        snapshot = self._snapshot(context, request.snapshot)
        layers = [export_pb2.ChainLayer(id=e.id, parent=e.base_id, size=e.size, digest=e.diff_id,
                                        tar_size=e.tar_size, chain_id=e.chain_id, created=e.layer.created,
                                        origin=self.backend.public_origin(e.layer))
                  for e in self.backend.chain(snapshot)]
        return export_pb2.GetChainResponse(layers=layers, driver=self.backend.driver.name,
                                           node_id=self.backend.node_id)

    def Changes(self, request: export_pb2.ChangesRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        snapshot = self._snapshot(context, request.snapshot)
        yield from self.backend.changes(snapshot, self.backend.base(snapshot, request.base))

    def DiffSize(self, request: export_pb2.DiffSizeRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        snapshot = self._snapshot(context, request.snapshot)
        base = self.backend.base(snapshot, request.base)
        return export_pb2.DiffSizeResponse(size=self.backend.driver.diff_size(snapshot.id, base.id if base else None))

    def ExportDiff(self, request: export_pb2.ExportDiffRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        snapshot = self._snapshot(context, request.snapshot)
        base = self.backend.base(snapshot, request.base)
        yield from self.backend.export(snapshot, base, request.compression, request.starting_offset)

    def OpenExport(self, request: export_pb2.ExportDiffRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """ExportDiff's request, checked as ExportDiff checks it; the stream is made when the
        ticket is redeemed on the bulk lane (FAILED_PRECONDITION on a listener without one)."""
        snapshot = self._snapshot(context, request.snapshot)
        base = self.backend.base(snapshot, request.base)
        if request.compression not in MEDIA:
            raise InvalidArgument(f"compression {request.compression} is not NONE or ZSTD")
        if self.lane is None:
            raise FailedPrecondition("this listener has no bulk lane: use ExportDiff")
        ticket = self.lane.tickets.issue(self.backend.bulk(snapshot, base, request.compression,
                                                           request.starting_offset))
        return export_pb2.ExportTicket(ticket=ticket, port=self.lane.port)

    def ImportDiff(self, request_iterator: Iterator[export_pb2.ImportDiffRequest],  # noqa: N802
                   context: grpc.ServicerContext) -> Any:
        self.access.check_import(context)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("ImportDiff: the first message must carry the header")
        if first.data:
            raise InvalidArgument("ImportDiff: the header message carries no data")
        return self.backend.import_diff(first.header, _Requests(request_iterator))


# ---------------------------------------------------------------------- wiring


def export_socket_path(csi_socket: Path) -> Path:
    """The export socket next to the CSI socket: ``<dir>/export.sock``."""
    return Path(csi_socket).with_name("export.sock")


def start_unix_export(backend: ExportBackend, path: Path, *, workers: int = 8,
                      resolver: SnapshotResolver | None = None) -> tuple[grpc.Server, str]:
    """A started server with the service on the owner-only unix socket ``path``."""
    server = new_server(workers, "export")
    export_pb2_grpc.add_DiffExportServicer_to_server(DiffExportService(backend, LocalAccess(resolver)), server)
    endpoint = listen_unix(server, path)
    server.start()
    return server, endpoint


@dataclass(frozen=True)
class TcpExportConfig:
    """The node's one TCP listener (``strata serve --peer-listen``): see :func:`start_tcp_export`."""

    address: str  # HOST:PORT (port 0: any)
    tls: TlsFiles
    audiences: tuple[str, ...] = ()  # token audiences asked of TokenReview ("" none)
    importers: tuple[str, ...] = ()  # ServiceAccounts namespace/name allowed to ImportDiff
    driver_name: str = ""  # VolumeSnapshotContents must belong to this CSI driver
    peers: tuple[str, ...] = ()  # strata's node ServiceAccounts: trusted peers (see ChannelAccess)
    controllers: tuple[str, ...] = ()  # strata's controller ServiceAccounts: the strata-internal services


class ChannelAccess(KubernetesAccess):
    """The TCP listener's policy: strata's own node ServiceAccounts (``peers``) are trusted
    peers — they may name any snapshot of this node by its handle or a GetChain layer ID (as
    a node pulling a chain for a cross-node restore does) or as a VolumeSnapshot (no
    SubjectAccessReview), and may ImportDiff; every other caller gets :class:`KubernetesAccess`
    (a VolumeSnapshot they may ``get``; ImportDiff only as a listed importer)."""

    allow_layer_ids = True  # only ever used for a peer's request: others resolve to a handle (checked below)

    def __init__(self, resolver: SnapshotResolver, reviewer: AccessReviewer, importers: Iterable[str] = (),
                 peers: Iterable[str] = ()) -> None:
        self.peers = {tuple(a.split("/", 1)) for a in peers}
        super().__init__(resolver, reviewer, [*importers, *peers])

    def _is_peer(self, context: grpc.ServicerContext) -> bool:
        caller = caller_of(context)
        return caller is not None and caller.service_account in self.peers

    def snapshot_id(self, context: grpc.ServicerContext, ref: export_pb2.SnapshotRef) -> str:
        if self._is_peer(context):
            if ref.snapshot_id:
                if ref.namespace or ref.name:
                    raise InvalidArgument("name the snapshot by snapshot_id or by namespace/name, not both")
                return ref.snapshot_id
            return self.resolver.handle(ref.namespace, ref.name)
        handle = super().snapshot_id(context, ref)
        parse_id(handle)  # a handle from the API, never a raw layer ID (NotFound otherwise)
        return handle


def start_tcp_export(backend: ExportBackend, config: TcpExportConfig, api_client: Any, *, workers: int = 8,
                     services: Iterable[tuple[str, Callable[[grpc.Server], None]]] = (),
                     observer: Observer | None = None, lane: BulkLane | None = None) -> tuple[grpc.Server, int]:
    """The node's one TCP listener for everything that crosses the network; returns the started
    server and its port. ``api_client`` is a ``kubernetes.client.ApiClient`` (or a callable
    returning one).

    TLS (:func:`csi.peers.tls.listen_tls`, certificates reloaded on rotation) and every call's
    ServiceAccount token checked with a TokenReview for ``config.audiences``
    (:class:`~csi.peers.auth.TokenAuthInterceptor`), inside the one error seam. On it: the
    Diff export service for any authenticated caller, decided per request by
    :class:`ChannelAccess`; and ``services`` — ``(method prefix, add(server))`` pairs of
    strata-internal services (the forwarded Controller calls, :mod:`csi.services.forwarder`)
    — for strata's own accounts only (``peers`` and ``controllers``). A method no rule names
    is PERMISSION_DENIED (:func:`csi.peers.auth.by_method`). With ``lane``, OpenExport hands
    out tickets for it (the caller's authority is checked here, on the channel)."""
    reviewer = TokenReviewer(api_client, config.audiences)
    preload_client()  # every first call is a TokenReview through the client
    services = tuple(services)
    own = allow_service_accounts(*config.peers, *config.controllers)
    rules: list[tuple[str, Authorizer | None]] = [(f"/{DIFF_EXPORT_SERVICE}/", None)]
    rules += [(prefix, own) for prefix, _ in services]
    server = new_server(workers, "peer-tcp", interceptors=[TokenAuthInterceptor(reviewer, by_method(rules))],
                        observer=observer)
    access = ChannelAccess(SnapshotResolver(api_client, config.driver_name), AccessReviewer(api_client),
                           config.importers, config.peers)
    export_pb2_grpc.add_DiffExportServicer_to_server(DiffExportService(backend, access, lane), server)
    for _, add in services:
        add(server)
    port = listen_tls(server, config.address, config.tls)
    server.start()
    return server, port


__all__ = ["Access", "BulkLane", "ChainEntry", "ChannelAccess", "DiffExportService", "ExportBackend", "KubernetesAccess",
           "LocalAccess",
           "TcpExportConfig", "export_socket_path", "start_tcp_export", "start_unix_export"]
