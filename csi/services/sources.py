"""Content sources that are not on this node: another node's snapshot or volume, an OCI backup.

What a CreateVolume content source names, and what happens to it (:func:`classify`):

==========================  ============================================================
``snap-…@<this node>``      a local snapshot: ``create(parent=snapshot)`` (the Controller)
``vol-…@<this node>``       a local volume: freeze + create (the Controller)
``snap-…@<node B>``         B's snapshot: GetChain from B over the node channel, ExportDiff
                            of the layers this node lacks, imported here; the volume is
                            made on the top imported layer
``vol-…@<node B>``          B's volume: B's Controller freezes it first (CreateSnapshot over
                            the node channel, a name derived from the new volume's name, so a
                            retry reuses it), then as a snapshot of B; the helper snapshot on
                            B is deleted once the volume exists here
``oci://host/repo@sha256:…``  an OCI backup (a statically provisioned VolumeSnapshotContent's
``oci-layout:/dir@sha256:…``  ``snapshotHandle``): the artifact's missing layers pulled from
                            the registry / layout, credentials from the request's
                            ``secrets`` (``.dockerconfigjson``)
==========================  ============================================================

**One import path.** Every pull is :func:`csi.backup.restore`: B's chain is presented as an
in-memory OCI artifact (:class:`PeerTarget`: a manifest and config built from GetChain, each
layer blob an uncompressed ExportDiff stream — its bytes on B's bulk lane, :mod:`csi.peers.bulk`
— checked against B's diff_id as it arrives), so a
layer is ``oci-<ChainID>`` whether it came from a registry or from a peer — the same layer —
and a layer this node already has (by ChainID) does not move: a second restore of the same
snapshot is GetChain plus existence checks. Each layer is imported into an ``ocitmp-`` layer,
verified, then frozen under its final name (never visible unverified); a kill -9 leaves an
``ocitmp-`` layer the start-up sweep removes.

**Transfers** (:class:`ContentSources`): at most one pull per source runs, in a background
thread; a CreateVolume waits for it up to ``wait`` seconds, then answers ABORTED (operation
pending) while it goes on; the repeated CreateVolume joins the same pull (never a second
one) and gets the layer when it is done. The pull is recorded (a ``transfers`` row, before
the first byte) and forgotten when the volume's record commits or the pull fails; after a
restart the row is rolled back (:mod:`csi.services.recovery`) and the repeated CreateVolume
resumes from the first layer this node lacks.

**Owner unreachable.** UNAVAILABLE naming the owner node. When the StorageClass names a
``backupTarget`` and that repository holds a backup of the snapshot (tagged with the snapshot's
layer ID by :class:`Uploads`, its config naming the snapshot handle), the volume is restored
from the backup instead, and :attr:`Pulled.note` says so (the Controller logs it and puts it
in the volume's context).

**Uploads** (:class:`Uploads`): CreateSnapshot with a VolumeSnapshotClass ``backupTarget``
freezes locally and uploads the snapshot's chain in the background with
:func:`csi.backup.backup`, tagged with the snapshot's layer ID; the record's ``backup_state``
says where it is and ``backup_ref`` keeps the immutable reference.
"""

from __future__ import annotations

import hashlib
import io
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from typing import IO

import grpc

from csi.backup import ExportIndex, VolumeFacts, backup, open_target, parse_reference, read_artifact, restore
from csi.backup.auth import DockerConfig
from csi.backup.media import (CONFIG, LAYER_TAR, Descriptor, LayerFacts, build_config, build_manifest, digest_bytes)
from csi.backup.progress import Progress
from csi.backup.reference import Reference
from csi.backup.target import VerifyingReader
from csi.errors import (Aborted, DigestMismatch, FailedPrecondition, InvalidArgument, NotFound, Relayed, StrataError,
                        Unavailable, Unsupported)
from csi.graphdriver.driver import Driver
from csi.peers.dial import PeerDialer
from csi.proto import csi_pb2, csi_pb2_grpc, export_pb2, export_pb2_grpc
from csi.services.requests import docker_config_of, is_backup_reference
from csi.services.volume_ids import SNAPSHOT_PREFIX, VOLUME_PREFIX, parse_id
from csi.state.store import BACKUP_DONE, BACKUP_FAILED, BACKUP_UPLOADING, StateStore, TransferRecord
from csi.services.exportclient import ExportDiffReader

log = logging.getLogger("strata.sources")

PEER_CALL_TIMEOUT = 60.0  # seconds for a unary call to another node
STREAM_IDLE_TIMEOUT = 120.0  # seconds without a message before an ExportDiff stream is given up
CLONE_SNAPSHOT_PREFIX = "strata-clone-"
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

LOCAL, PEER_SNAPSHOT, PEER_VOLUME, BACKUP = "local", "peer-snapshot", "peer-volume", "backup"


@dataclass(frozen=True)
class Source:
    """A classified content source (:func:`classify`)."""

    kind: str  # LOCAL, PEER_SNAPSHOT, PEER_VOLUME or BACKUP
    source_id: str
    owner: str = ""  # the node that holds it (peer kinds)
    reference: Reference | None = None  # BACKUP

    @property
    def remote(self) -> bool:
        return self.kind != LOCAL


def classify(source_kind: str, source_id: str, node_id: str) -> Source:
    """What a CreateVolume content source names (see the module docstring). An ID strata did
    not issue is NOT_FOUND (an unknown object); a malformed backup reference INVALID_ARGUMENT
    — except that a backup without ``@sha256:`` is NOT_FOUND too: a tag can move, so it names no
    fixed content."""
    if source_kind == "snapshot" and is_backup_reference(source_id):
        ref = parse_reference(source_id)
        if ref.digest is None:
            raise NotFound(f"snapshot {source_id} names a backup by tag only: a snapshot handle must name the "
                           "artifact by digest (…@sha256:…)")
        return Source(BACKUP, source_id, reference=ref)
    layer, owner = parse_id(source_id)
    prefix = SNAPSHOT_PREFIX if source_kind == "snapshot" else VOLUME_PREFIX
    if not layer.startswith(prefix):
        raise NotFound(f"{source_kind} {source_id} does not exist (not a {source_kind} ID)")
    if owner == node_id:
        return Source(LOCAL, source_id, owner)
    return Source(PEER_SNAPSHOT if source_kind == "snapshot" else PEER_VOLUME, source_id, owner)


@dataclass(frozen=True)
class Pulled:
    """A remote source made local: ``layer_id`` is the frozen layer to create the volume on."""

    layer_id: str
    min_bytes: int = 0  # the capacity the source needs (a backup's recorded capacity)
    origin: str = ""  # "node B", "oci://…@sha256:…"
    note: str = ""  # what the caller should know (e.g. restored from a backup: the owner is gone)
    imported: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    bytes_pulled: int = 0
    cleanup: Callable[[], None] | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------- talking to the owner


def _relay(exc: grpc.RpcError, owner: str, what: str) -> StrataError:
    """A failed call to ``owner`` as the error this node answers with."""
    code, details = exc.code(), exc.details() or ""
    if code in _UNREACHABLE:
        return Unavailable(f"node {owner}, the owner of {what}, cannot be reached: {details or code.name}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what} does not exist on node {owner}: {details}")
    if code == grpc.StatusCode.DATA_LOSS:
        return DigestMismatch(f"node {owner} sent {what} corrupt: {details}")
    return Relayed(code.name, f"node {owner} answered for {what}: {details}")


class PeerTarget:
    """The owner's chain of a snapshot as a read-only backup target (see the module docstring):
    :func:`csi.backup.restore` reads it as it reads a registry."""

    def __init__(self, stub: export_pb2_grpc.DiffExportStub, owner: str, snapshot_id: str,
                 chain: export_pb2.GetChainResponse, on_bytes: Callable[[int], None] | None = None,
                 connect: Callable[[int], ssl.SSLSocket] | None = None) -> None:
        if not chain.layers:
            raise NotFound(f"node {owner} answered an empty chain for snapshot {snapshot_id}")
        self._stub, self.owner, self._on_bytes, self._connect = stub, owner, on_bytes, connect
        self._entries: dict[str, export_pb2.ChainLayer] = {}
        facts = []
        for entry in chain.layers:
            self._entries.setdefault(entry.digest, entry)
            facts.append(LayerFacts(entry.id, entry.digest, Descriptor(LAYER_TAR, entry.digest, entry.tar_size)))
        self.config = build_config(VolumeFacts(driver=chain.driver, source_names={"snapshot": snapshot_id,
                                                                                 "node": owner}),
                                   facts, "1970-01-01T00:00:00Z")
        config_desc = Descriptor(CONFIG, digest_bytes(self.config), len(self.config))
        self.manifest = build_manifest(config_desc, facts, {})
        self.digest = digest_bytes(self.manifest)
        self.total = sum(e.tar_size for e in chain.layers)

    def get_manifest(self, tag_or_digest: str) -> tuple[bytes, str]:
        if tag_or_digest != self.digest:
            raise NotFound(f"manifest {tag_or_digest} is not the chain of node {self.owner}")
        return self.manifest, self.digest

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        if digest == digest_bytes(self.config):
            raw: IO[bytes] = io.BytesIO(self.config)
            return VerifyingReader(raw, digest, size, "chain config")  # type: ignore[return-value]
        entry = self._entries.get(digest)
        if entry is None:
            raise NotFound(f"blob {digest} is not in the chain of node {self.owner}")
        stream = ExportDiffReader(self._stub, entry.id, entry.parent, source=f"node {self.owner}",
                                  relay=lambda exc: _relay(exc, self.owner, f"layer {entry.id}"),
                                  on_bytes=self._on_bytes, connect=self._connect)
        return VerifyingReader(stream, digest, size, f"layer {entry.id} from node {self.owner}",  # type: ignore[arg-type,return-value]
                               hashed=True)

    def location(self) -> str:
        return f"strata-node:{self.owner}"

    def has_blob(self, digest: str) -> bool:
        return digest in self._entries

    def mount_blob(self, digest: str, from_locations: list[str]) -> bool:
        return False

    def put_blob(self, stream: IO[bytes], expected: str | None = None) -> tuple[str, int]:
        raise Unsupported("a peer's chain is read-only")

    def put_manifest(self, data: bytes, tag: str | None) -> str:
        raise Unsupported("a peer's chain is read-only")

    def delete(self, tag_or_digest: str) -> None:
        raise Unsupported("a peer's chain is read-only")

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------- transfers


@dataclass
class _Job:
    source: Source
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Pulled | None = None
    error: BaseException | None = None
    moved: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    names: set[str] = field(default_factory=set)


class ContentSources:
    """Pulls of remote content sources, at most one per source, in the background."""

    def __init__(self, driver: Driver, store: StateStore, node_id: str, dialer: PeerDialer | None,
                 index: ExportIndex | None, wait_seconds: float) -> None:
        self.driver, self.store, self.node_id = driver, store, node_id
        self.dialer, self.index, self.wait_seconds = dialer, index, wait_seconds
        self._jobs: dict[str, _Job] = {}
        self._guard = threading.Lock()

    def pending(self) -> list[str]:
        with self._guard:
            return sorted(self._jobs)

    def obtain(self, name: str, source: Source, secrets: Mapping[str, str],
               parameters: Mapping[str, str]) -> Pulled:
        """The local frozen layer for ``source``, pulling what is missing (see the module
        docstring); ABORTED while the pull is still running after ``wait_seconds``."""
        credentials = docker_config_of(secrets)  # a malformed secret fails before anything moves
        with self._guard:
            job = self._jobs.get(source.source_id)
            if job is None:
                job = self._jobs[source.source_id] = _Job(source)
                job.thread = threading.Thread(target=self._run, args=(job, credentials, dict(parameters), name),
                                              name=f"pull-{name}", daemon=True)
                fresh = True
            else:
                fresh = False
            if name not in job.names:
                job.names.add(name)
                self.store.add_transfer(TransferRecord(name, source.source_id, source.owner))
        if fresh:
            log.info("volume %r: pulling %s%s in the background", name, source.source_id,
                     f" from node {source.owner}" if source.owner else "")
            assert job.thread is not None
            job.thread.start()
        if not job.done.wait(self.wait_seconds):
            moved = f"{job.moved} of {job.total or '?'} bytes" if job.total else f"{job.moved} bytes"
            raise Aborted(f"volume {name!r}: the content of {source.source_id} is still being pulled "
                          f"{'from node ' + source.owner if source.owner else 'from its backup'} ({moved} after "
                          f"{time.monotonic() - job.started:.0f} s): operation pending, retry")
        with self._guard:
            if self._jobs.get(source.source_id) is job:
                del self._jobs[source.source_id]
            job.names.discard(name)
        if job.error is not None:
            self.store.delete_transfer(name)
            raise job.error
        assert job.result is not None
        return job.result

    def finished(self, name: str) -> None:
        """The volume of ``name`` is recorded (or failed): forget its transfer row."""
        self.store.delete_transfer(name)

    def _run(self, job: _Job, credentials: DockerConfig | None, parameters: dict[str, str], name: str) -> None:
        try:
            job.result = self._pull(job, credentials, parameters, name)
            log.info("pulled %s from %s: %d layer(s) imported, %d reused, %d bytes", job.source.source_id,
                     job.result.origin, len(job.result.imported), len(job.result.reused), job.result.bytes_pulled)
        except BaseException as exc:  # handed to the CreateVolume that collects the job
            log.warning("pull of %s failed: %s", job.source.source_id, exc)
            job.error = exc
        finally:
            job.done.set()

    def _progress(self, job: _Job) -> Callable[[Progress], None]:
        def report(p: Progress) -> None:
            job.moved, job.total = p.done, p.total or job.total
        return report

    def _pull(self, job: _Job, credentials: DockerConfig | None, parameters: dict[str, str], name: str) -> Pulled:
        source = job.source
        if source.kind == BACKUP:
            assert source.reference is not None
            return self._from_backup(source.reference, credentials, self._progress(job))
        if source.kind == PEER_VOLUME:
            return self._clone_remote(job, credentials, parameters, name)
        return self._from_peer(job, source.source_id, credentials, parameters)

    # -------------------------------------------------------------- the three ways

    def _from_backup(self, ref: Reference, credentials: DockerConfig | None,
                     progress: Callable[[Progress], None], note: str = "") -> Pulled:
        with closing(open_target(ref, credentials=credentials)) as target:
            result = restore(self.driver, target, ref.require_digest(), index=self.index, progress=progress)
        if result.artifact.facts.access_type == "block":
            raise InvalidArgument(f"backup {ref} holds a block volume: it cannot be restored as a filesystem")
        return Pulled(result.layer_id, result.artifact.facts.capacity_bytes or 0, str(ref), note, result.imported,
                      result.reused, result.bytes_pulled)

    def _stub(self, owner: str) -> export_pb2_grpc.DiffExportStub:
        if self.dialer is None:
            raise Unavailable(f"node {owner} owns the source, and this plugin has no channel to other nodes "
                              "(the node-to-node channel is not configured)")
        return export_pb2_grpc.DiffExportStub(self.dialer.dial(owner))

    def _from_peer(self, job: _Job, snapshot_id: str, credentials: DockerConfig | None,
                   parameters: Mapping[str, str]) -> Pulled:
        owner = job.source.owner
        try:
            stub = self._stub(owner)
            try:
                chain = stub.GetChain(export_pb2.GetChainRequest(snapshot=export_pb2.SnapshotRef(
                    snapshot_id=snapshot_id)), timeout=PEER_CALL_TIMEOUT)
            except grpc.RpcError as exc:
                raise _relay(exc, owner, f"snapshot {snapshot_id}") from None
        except Unavailable as exc:
            if self.dialer is not None:
                self.dialer.forget(owner)
            fallback = self._backup_of(snapshot_id, parameters, credentials)
            if fallback is None:
                raise
            note = (f"node {owner}, the owner of snapshot {snapshot_id}, cannot be reached ({exc}); "
                    f"restored from its backup {fallback}")
            log.warning("%s", note)
            return self._from_backup(fallback, credentials, self._progress(job), note)

        def moved(n: int) -> None:
            job.moved += n

        dialer = self.dialer
        target = PeerTarget(stub, owner, snapshot_id, chain, moved,
                            connect=(lambda port: dialer.connect(owner, port)) if dialer is not None else None)
        job.total = target.total
        try:
            result = restore(self.driver, target, target.digest, index=self.index)  # type: ignore[arg-type]
        except Unavailable:
            if self.dialer is not None:
                self.dialer.forget(owner)
            raise
        return Pulled(result.layer_id, 0, f"node {owner}", "", result.imported, result.reused, result.bytes_pulled)

    def _backup_of(self, snapshot_id: str, parameters: Mapping[str, str],
                   credentials: DockerConfig | None) -> Reference | None:
        """The backup of another node's snapshot in the StorageClass's ``backupTarget``: the
        artifact tagged with the snapshot's layer ID whose config names the snapshot."""
        target_text = parameters.get("backupTarget", "")
        if not target_text:
            return None
        layer = parse_id(snapshot_id)[0]
        ref = parse_reference(f"{target_text}:{layer}")
        try:
            with closing(open_target(ref, credentials=credentials)) as target:
                _, digest = target.get_manifest(layer)
                art = read_artifact(target, digest)
        except NotFound:
            log.info("no backup of %s in %s", snapshot_id, target_text)
            return None
        except StrataError as exc:
            log.warning("cannot look for a backup of %s in %s: %s", snapshot_id, target_text, exc)
            return None
        if art.facts.source_names.get("snapshot") != snapshot_id:
            log.warning("%s is tagged %s but is the backup of %r, not of %s", target_text, layer,
                        art.facts.source_names.get("snapshot"), snapshot_id)
            return None
        return ref.with_digest(digest)

    def _clone_remote(self, job: _Job, credentials: DockerConfig | None, parameters: dict[str, str],
                      name: str) -> Pulled:
        """Another node's volume: its Controller freezes it (a helper snapshot whose name comes
        from the new volume's name, so a retry reuses it), the snapshot is pulled, and the helper
        snapshot is deleted on the owner once the volume exists here (:attr:`Pulled.cleanup`)."""
        owner, volume_id = job.source.owner, job.source.source_id
        if self.dialer is None:
            raise Unavailable(f"node {owner} owns volume {volume_id}, and this plugin has no channel to other nodes")
        controller = csi_pb2_grpc.ControllerStub(self.dialer.dial(owner))
        helper = CLONE_SNAPSHOT_PREFIX + hashlib.sha256(f"{self.node_id}\0{name}".encode()).hexdigest()[:40]
        try:
            snap = controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=helper, source_volume_id=volume_id),
                                             timeout=PEER_CALL_TIMEOUT).snapshot
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise FailedPrecondition(f"node {owner} does not serve its Controller over the node channel, so "
                                         f"volume {volume_id} cannot be frozen for a clone here: snapshot it and "
                                         "restore from the snapshot") from None
            if exc.code() in _UNREACHABLE:
                self.dialer.forget(owner)
            raise _relay(exc, owner, f"volume {volume_id}") from None
        pulled = self._from_peer(job, snap.snapshot_id, credentials, {})
        dialer = self.dialer

        def cleanup() -> None:
            try:
                csi_pb2_grpc.ControllerStub(dialer.dial(owner)).DeleteSnapshot(
                    csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=PEER_CALL_TIMEOUT)
            except (grpc.RpcError, StrataError) as exc:
                log.warning("could not delete the clone's helper snapshot %s on node %s (%s); the next clone of "
                            "this name reuses it", snap.snapshot_id, owner, exc)

        return Pulled(pulled.layer_id, 0, f"node {owner} (volume {volume_id} frozen as {snap.snapshot_id})",
                      pulled.note, pulled.imported, pulled.reused, pulled.bytes_pulled, cleanup)


# ---------------------------------------------------------------------- uploads


class Uploads:
    """Background uploads of snapshots to their backup target (see the module docstring)."""

    def __init__(self, driver: Driver, store: StateStore, node_id: str, index: ExportIndex | None) -> None:
        self.driver, self.store, self.node_id, self.index = driver, store, node_id, index
        self._running: dict[str, threading.Thread] = {}
        self._guard = threading.Lock()

    def running(self, layer: str) -> bool:
        with self._guard:
            thread = self._running.get(layer)
            return thread is not None and thread.is_alive()

    def start(self, layer: str, snapshot_id: str, name: str, target: str, compression: str, capacity: int,
              credentials: DockerConfig | None) -> None:
        """Upload ``layer`` to ``target`` tagged with its layer ID, unless an upload of it runs."""
        with self._guard:
            thread = self._running.get(layer)
            if thread is not None and thread.is_alive():
                return
            self.store.set_snapshot_backup(layer, backup_state=BACKUP_UPLOADING)
            thread = self._running[layer] = threading.Thread(
                target=self._run, args=(layer, snapshot_id, name, target, compression, capacity, credentials),
                name=f"upload-{layer}", daemon=True)
            thread.start()

    def _run(self, layer: str, snapshot_id: str, name: str, target_text: str, compression: str, capacity: int,
             credentials: DockerConfig | None) -> None:
        ref = parse_reference(f"{target_text}:{layer}")
        facts = VolumeFacts(capacity_bytes=capacity or None, driver=self.driver.name,
                            source_names={"snapshot": snapshot_id, "node": self.node_id, "name": name})
        try:
            with closing(open_target(ref, credentials=credentials, create=True)) as target:
                result = backup(self.driver, layer, target, tag=layer, facts=facts, index=self.index,
                                compression=compression)
        except BaseException as exc:  # noqa: BLE001 - recorded; the next CreateSnapshot starts it again
            log.warning("backup of snapshot %s to %s failed: %s", snapshot_id, target_text, exc)
            try:
                self.store.set_snapshot_backup(layer, backup_state=BACKUP_FAILED)
            except StrataError:
                log.warning("could not record the failed backup of %s", snapshot_id, exc_info=True)
        else:
            self.store.set_snapshot_backup(layer, backup_state=BACKUP_DONE, backup_ref=result.reference)
            log.info("snapshot %s backed up as %s (%d blob(s) sent, %d skipped, %d bytes)", snapshot_id,
                     result.reference, result.blobs_sent, result.blobs_skipped, result.bytes_sent)
        finally:
            with self._guard:
                self._running.pop(layer, None)

    def delete_tag(self, target_text: str, layer: str, credentials: DockerConfig | None) -> None:
        """Remove the snapshot's tag (and the manifest it names) from its backup target."""
        ref = parse_reference(f"{target_text}:{layer}")
        try:
            with closing(open_target(ref, credentials=credentials)) as target:
                target.delete(layer)
        except NotFound:
            pass
        log.info("removed the backup %s", ref)


__all__ = ["BACKUP", "ContentSources", "LOCAL", "PEER_SNAPSHOT", "PEER_VOLUME", "PeerTarget",
           "Pulled", "Source", "Uploads", "classify"]
