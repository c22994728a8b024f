"""``strata backup``: a snapshot to an OCI registry or image layout, and back.

Usage::

    strata backup push SNAPSHOT_ID --to oci://HOST/REPO[:TAG] | oci-layout:/DIR[:TAG]
                       [--docker-config FILE] [--compression none|zstd] [--max-layer-bytes SIZE]
                       [--root DIR] [--endpoint unix://…]
    strata backup restore REF@sha256:… [--volume-name NAME] [--node-id ID] [--root DIR] [--endpoint unix://…]

``SNAPSHOT_ID`` is the CSI snapshot handle (``snap-<hex>@<node>``, a VolumeSnapshotContent's
``status.snapshotHandle``) or a frozen layer ID. On stdout: one JSON object with the result
(``reference`` — ``…@sha256:…``, what a restore takes — bytes and blobs sent or pulled, the
restored layer and volume). Progress on stderr: a bar with bytes and rate on a terminal, JSON
lines otherwise (:func:`csi.backup.renderer_for`). Registry credentials come from
``--docker-config`` (a docker config / ``.dockerconfigjson`` file), else ``$DOCKER_CONFIG/config.json``
or ``~/.docker/config.json`` when present; they are never printed.

Two ways to reach the node's layers, chosen by what runs:

* **Through the plugin** (``strata serve`` answers on the CSI socket): every read and write
  goes through its Diff export service on the owner-only unix socket next to it
  (``export.sock``, :mod:`csi.services.export`), so the driver is opened once, by the plugin.
  ``push`` runs :func:`csi.backup.backup` over a driver view built from ``GetChain`` and
  ``ExportDiff`` (a lost stream resumes with ``starting_offset``; every stream is checked
  against the digest the service announces); the digests GetChain returns let an unchanged
  layer be skipped without producing it. ``restore`` imports each layer the node lacks with
  ``ImportDiff`` (verified by the plugin before it exists; a header-only call first, so a layer
  the node has is not downloaded), then, with ``--volume-name``, asks the plugin's Controller for
  ``CreateVolume(name, content source = the backup reference)``.
* **Directly** (no plugin serving the root): the driver that holds state under ``--root`` is
  opened here; ``push`` and ``restore`` are :func:`csi.backup.backup` /
  :func:`csi.backup.restore` on it with the node's export cache (``<driver home>/backup-index.json``);
  ``restore --volume-name`` then creates a writable layer on the restored chain and records it
  as a CSI volume of that name in ``<root>/state.db`` (its ID, ``vol-…@<node-id>``, is printed:
  a static PersistentVolume's ``volumeHandle``). Direct commands on one root run one at a time
  (an flock on ``<root>/backup-direct.lock``). Their diff streams read through the driver's
  ``view`` (held in memory only), so a killed one leaves no reference behind.

``--max-layer-bytes`` splits a layer whose diff is larger into several artifact layers
(:mod:`csi.backup.split`), for registries with a layer size limit.

Exit status: 0 done, 1 failed (the message says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any

import grpc

from csi.backup import (DockerConfig, ExportIndex, VolumeFacts, backup, load_docker_config, open_target,
                        parse_reference, read_artifact, renderer_for, restore)
from csi.backup.index import ArtifactRecord, ExportRecord
from csi.backup.media import LAYER_TAR
from csi.backup.progress import Meter, ProgressCallback
from csi.errors import AlreadyExists, InvalidArgument, NotFound, Relayed, StrataError
from csi.graphdriver.driver import CreateOpts, Driver, Layer, LayerKind, LayerState
from csi.graphdriver.registry import DRIVER_CLASSES, home_of, new_driver
from csi.host.fsinfo import parse_size
from csi.ids import check_layer_id, new_layer_id
from csi.ops.console import add_common_flags, setup_logging
from csi.ops.records import drivers_with_state, plugin_serving, socket_of
from csi.proto import csi_pb2, csi_pb2_grpc, export_pb2, export_pb2_grpc
from csi.services.export import export_socket_path
from csi.services.volume_ids import VOLUME_PREFIX, make_id, parse_id
from csi.state.readonly import read_records
from csi.state.store import RecordState, StateStore, VolumeRecord
from csi.services.exportclient import ExportDiffReader

log = logging.getLogger("strata.backup")

INDEX_NAME = "backup-index.json"
DIRECT_LOCK = "backup-direct.lock"
CHUNK = 1 << 20


def _layer_id(value: str) -> str:
    """The layer of a CSI handle (``snap-…@node``) or a raw layer ID."""
    return parse_id(value)[0] if "@" in value else check_layer_id(value, "snapshot")


def _credentials(path: str | None) -> DockerConfig | None:
    if path:
        return load_docker_config(path)
    default = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    return load_docker_config(default) if default.is_file() else None


# ---------------------------------------------------------------------- through the plugin


class RemoteChain:
    """The part of the driver contract :func:`csi.backup.backup` reads, answered by the plugin's
    export service: one snapshot's chain (GetChain) and its diffs (ExportDiff).

    A layer outside that chain — the snapshot of an earlier backup that
    :func:`csi.backup.export.incremental_base` asks about — is looked up once with a GetChain
    of its own (its ``created`` and ``origin``; NOT_FOUND, or a layer that is no snapshot,
    is "does not exist"), so a sibling snapshot of the same volume can be the base of the
    diff, as in direct mode; the service accepts such a base (same origin, older)."""

    _ABSENT = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.UNIMPLEMENTED)

    def __init__(self, stub: export_pb2_grpc.DiffExportStub, snapshot_id: str) -> None:
        self._stub = stub
        answer = _call(lambda: self._get_chain(snapshot_id))
        self.name = answer.driver
        self.node_id = answer.node_id
        self.entries: dict[str, Any] = {}
        self._public: dict[str, str] = {}
        self._absent: set[str] = set()
        self._learn(answer)
        self.top = _layer_id(answer.layers[-1].id)

    def _get_chain(self, snapshot_id: str) -> export_pb2.GetChainResponse:
        return self._stub.GetChain(export_pb2.GetChainRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=snapshot_id)))

    def _learn(self, answer: export_pb2.GetChainResponse) -> None:
        for e in answer.layers:
            self.entries.setdefault(_layer_id(e.id), e)
            self._public.setdefault(_layer_id(e.id), e.id)

    def _known(self, layer_id: str) -> bool:
        """Whether the plugin has ``layer_id`` as a visible snapshot (one GetChain per layer
        outside the chain, remembered)."""
        if layer_id in self.entries:
            return True
        if layer_id in self._absent:
            return False
        try:
            self._learn(self._get_chain(layer_id))
        except grpc.RpcError as exc:
            if exc.code() not in self._ABSENT:
                raise Relayed(exc.code().name, str(exc.details())) from None
            self._absent.add(layer_id)
            return False
        return layer_id in self.entries

    def layer(self, layer_id: str) -> Layer:
        if not self._known(layer_id):
            raise NotFound(f"layer {layer_id} is not a snapshot the plugin has")
        e = self.entries[layer_id]
        return Layer(layer_id, _layer_id(e.parent) if e.parent else None, LayerKind.FROZEN, state=LayerState.READY,
                     origin=_layer_id(e.origin) if e.origin else None, created=e.created)

    def exists(self, layer_id: str) -> bool:
        return self._known(layer_id)

    def chain(self, layer_id: str) -> list[Layer]:
        out, current = [], self.layer(layer_id)
        while True:
            out.append(current)
            if current.parent is None:
                return out
            current = self.layer(current.parent)

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        base = self._public[parent] if parent else ""
        return ExportDiffReader(self._stub, self._public[layer_id], base)  # type: ignore[return-value]


class ChainIndex:
    """The export cache as :func:`csi.backup.backup` sees it through the plugin: the node's own
    cache file when readable here, plus the uncompressed digests GetChain announced."""

    def __init__(self, chain: RemoteChain, inner: ExportIndex | None) -> None:
        self.chain, self.inner = chain, inner

    def lookup(self, layer_id: str, base_id: str | None, media_type: str, created: float) -> ExportRecord | None:
        rec = self.inner.lookup(layer_id, base_id, media_type, created) if self.inner else None
        e = self.chain.entries.get(layer_id)
        if rec is None and media_type == LAYER_TAR and e is not None and \
                (_layer_id(e.parent) if e.parent else None) == base_id and e.tar_size:
            rec = ExportRecord(layer_id, base_id, created, LAYER_TAR, e.digest, e.digest, e.tar_size)
        return rec

    def record(self, rec: ExportRecord) -> None:
        if self.inner is not None:
            self.inner.record(rec)

    def artifacts(self, location: str, media_type: str) -> list[ArtifactRecord]:
        """The node's records of earlier backups (those of this chain's layers and of older
        snapshots of the same volume can be built on: the export service diffs a snapshot
        against either)."""
        return self.inner.artifacts(location, media_type) if self.inner else []

    def record_artifact(self, rec: ArtifactRecord) -> None:
        if self.inner is not None:
            self.inner.record_artifact(rec)


def _call(fn: Any) -> Any:
    try:
        return fn()
    except grpc.RpcError as exc:
        raise Relayed(exc.code().name, str(exc.details())) from None


def _node_index(root: Path, driver_name: str) -> ExportIndex | None:
    home = home_of(root, driver_name)
    return ExportIndex(home / INDEX_NAME) if home.is_dir() else None


def volume_facts(root: Path, driver_name: str, snapshot_id: str, layer_id: str, origin: str | None = None,
                 node_id: str = "") -> VolumeFacts:
    """The facts a backup config carries, from the CSI records under ``root`` (read-only): the
    capacity of the snapshot's volume (the snapshot record's size, else the capacity of the
    volume it was taken of, ``origin``) and the snapshot's name. Unknown facts are left out
    (a restore then asks for no particular size); unreadable records do not stop a backup."""
    names = {"snapshot": snapshot_id, **({"node": node_id} if node_id else {})}
    try:
        records = read_records(root)
    except StrataError as exc:
        log.warning("backup of %s: the CSI records are unreadable, the capacity is not recorded: %s", snapshot_id, exc)
        return VolumeFacts(driver=driver_name, source_names=names)
    snap = next((r for r in records.snapshots if r.layer == layer_id), None)
    capacity = snap.size if snap is not None and snap.size > 0 else None
    if snap is not None and snap.name:
        names["name"] = snap.name
    source = snap.source_layer if snap is not None and snap.source_layer else origin
    if capacity is None and source:
        vol = next((v for v in records.volumes if v.layer == source), None)
        capacity = vol.capacity if vol is not None and vol.capacity > 0 else None
    return VolumeFacts(capacity_bytes=capacity, driver=driver_name, source_names=names)


def push_remote(channel: grpc.Channel, root: Path, snapshot_id: str, ref_text: str, *, credentials: DockerConfig | None,
                compression: str, progress: ProgressCallback, max_layer_bytes: int | None = None) -> dict[str, Any]:
    stub = export_pb2_grpc.DiffExportStub(channel)
    chain = RemoteChain(stub, snapshot_id)
    ref = parse_reference(ref_text)
    facts = volume_facts(root, chain.name, snapshot_id, chain.top, node_id=chain.node_id)
    with closing(open_target(ref, credentials=credentials, create=True)) as target:
        result = backup(chain, chain.top, target, tag=ref.tag, facts=facts,  # type: ignore[arg-type]
                        index=ChainIndex(chain, _node_index(root, chain.name)),  # type: ignore[arg-type]
                        compression=compression, progress=progress, max_layer_bytes=max_layer_bytes)
    return _push_answer(result)


def _import_messages(target: Any, desc: Any, header: export_pb2.ImportHeader,
                     meter: Meter) -> Iterator[export_pb2.ImportDiffRequest]:
    yield export_pb2.ImportDiffRequest(header=header)
    blob = target.open_blob(desc.digest, desc.size)
    try:
        while data := blob.read(CHUNK):
            meter.advance(len(data))
            yield export_pb2.ImportDiffRequest(data=data)
    finally:
        blob.close()


def restore_remote(export_channel: grpc.Channel, csi_channel: grpc.Channel, ref_text: str, *,
                   credentials: DockerConfig | None, volume_name: str,
                   progress: ProgressCallback) -> dict[str, Any]:
    stub = export_pb2_grpc.DiffExportStub(export_channel)
    ref = parse_reference(ref_text)
    digest = ref.require_digest()
    with closing(open_target(ref, credentials=credentials)) as target:
        art = read_artifact(target, digest)
        meter = Meter("restore", progress, total=sum(d.size for d in art.layers))
        parent, imported, reused = "", [], []
        for desc, diff_id in zip(art.layers, art.diff_ids):
            meter.begin(desc.digest, desc.size)
            header = export_pb2.ImportHeader(parent=parent, diff_id=diff_id, media_type=desc.media_type,
                                             digest=desc.digest, capacity_bytes=art.facts.capacity_bytes or 0)
            try:  # a header-only call first: a layer the node has costs no download
                answer = stub.ImportDiff(iter([export_pb2.ImportDiffRequest(header=header)]))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise Relayed(exc.code().name, str(exc.details())) from None
                answer = _call(lambda: stub.ImportDiff(_import_messages(target, desc, header, meter)))
            (reused if answer.existed else imported).append(answer.layer_id)
            if answer.existed:
                meter.skip(desc.digest, desc.size)
            meter.end_blob(desc.digest)
            parent = answer.layer_id
        meter.finish()
    out: dict[str, Any] = {"reference": str(ref), "layer": parent, "imported": imported, "reused": reused,
                           "bytes_pulled": meter.done}
    if volume_name:
        controller = csi_pb2_grpc.ControllerStub(csi_channel)
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        request = csi_pb2.CreateVolumeRequest(
            name=volume_name, volume_capabilities=[capability],
            capacity_range=csi_pb2.CapacityRange(required_bytes=art.facts.capacity_bytes or 0),
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=str(ref))))
        try:
            volume = controller.CreateVolume(request).volume
        except grpc.RpcError as exc:
            raise Relayed(exc.code().name, f"the layers are imported (top layer {parent}), but the plugin did not "
                                           f"create volume {volume_name!r} from {ref}: {exc.details()}") from None
        out["volume_id"] = volume.volume_id
    return out


# ---------------------------------------------------------------------- directly on the root


def open_driver(root: Path, name: str | None, options: dict[str, str]) -> Driver:
    if name is None:
        held = drivers_with_state(root)
        if len(held) != 1:
            raise InvalidArgument(f"{root} holds state of {', '.join(held) or 'no driver'}: "
                                  "name the driver with --driver")
        name = held[0]
    return new_driver(root, name, options).driver


@contextmanager
def direct_session(root: Path, drv: Driver) -> Iterator[None]:
    """One direct command at a time on ``root`` (an exclusive flock on ``<root>/backup-direct.lock``)."""
    with open(root / DIRECT_LOCK, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def push_direct(drv: Driver, root: Path, snapshot_id: str, ref_text: str, *, credentials: DockerConfig | None,
                compression: str, progress: ProgressCallback, max_layer_bytes: int | None = None) -> dict[str, Any]:
    ref = parse_reference(ref_text)
    layer = _layer_id(snapshot_id)
    facts = volume_facts(root, drv.name, snapshot_id, layer, drv.layer(layer).origin if drv.exists(layer) else None)
    with closing(open_target(ref, credentials=credentials, create=True)) as target:
        result = backup(drv, layer, target, tag=ref.tag, facts=facts,
                        index=ExportIndex(home_of(root, drv.name) / INDEX_NAME), compression=compression,
                        progress=progress, max_layer_bytes=max_layer_bytes)
    return _push_answer(result)


def restore_direct(drv: Driver, root: Path, ref_text: str, *, credentials: DockerConfig | None, volume_name: str,
                   node_id: str, progress: ProgressCallback) -> dict[str, Any]:
    ref = parse_reference(ref_text)
    with closing(open_target(ref, credentials=credentials)) as target:
        result = restore(drv, target, ref.require_digest(), index=ExportIndex(home_of(root, drv.name) / INDEX_NAME),
                         progress=progress)
    out: dict[str, Any] = {"reference": str(ref), "layer": result.layer_id, "imported": list(result.imported),
                           "reused": list(result.reused), "bytes_pulled": result.bytes_pulled}
    if volume_name:
        out["volume_id"] = _create_volume(drv, root, volume_name, node_id, result.layer_id,
                                          result.artifact.facts.capacity_bytes, str(ref))
    return out


def _create_volume(drv: Driver, root: Path, name: str, node_id: str, parent: str, capacity: int | None,
                   source: str) -> str:
    """A writable layer on ``parent`` recorded as CSI volume ``name`` (as CreateVolume records one)."""
    store = StateStore(root)
    try:
        if store.volume_by_name(name) is not None:
            raise AlreadyExists(f"a volume named {name!r} exists on this node already")
        layer = new_layer_id(VOLUME_PREFIX)
        volume_id = make_id(layer, node_id)
        drv.create(layer, parent, CreateOpts(size_bytes=capacity or None))
        try:
            store.add_volume(VolumeRecord(layer=layer, name=name, capacity=capacity or 0,
                                          parameters={"restoredFrom": source}, state=RecordState.READY))
        except BaseException:
            drv.remove(layer)
            raise
        return volume_id
    finally:
        store.close()


def _push_answer(result: Any) -> dict[str, Any]:
    return {"reference": result.reference, "digest": result.manifest_digest, "tag": result.tag,
            "layers": [{"layer": l.layer_id, "diff_id": l.diff_id, "digest": l.blob.digest,
                        "size": l.blob.size} for l in result.layers],
            "bytes_sent": result.bytes_sent, "blobs_sent": result.blobs_sent, "blobs_skipped": result.blobs_skipped}


# ---------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata backup", description="Back up a snapshot as an OCI artifact, "
                                     "or restore one.")
    sub = parser.add_subparsers(dest="action", required=True)
    push = sub.add_parser("push", help="write a snapshot's chain to a registry or an OCI layout")
    push.add_argument("snapshot", metavar="SNAPSHOT_ID", help="CSI snapshot handle (snap-…@node) or layer ID")
    push.add_argument("--to", required=True, help="oci://HOST/REPO[:TAG] or oci-layout:/DIR[:TAG]")
    push.add_argument("--compression", choices=("none", "zstd"), default="none")
    push.add_argument("--max-layer-bytes", default=None, metavar="SIZE",
                      help="split a layer whose diff is larger than this into several (a registry's layer limit)")
    rest = sub.add_parser("restore", help="import a backup's layers (and create a volume on them)")
    rest.add_argument("reference", metavar="REF", help="oci://HOST/REPO@sha256:… or oci-layout:/DIR@sha256:…")
    rest.add_argument("--volume-name", default="", help="also create a CSI volume of this name on the restored chain")
    rest.add_argument("--node-id", default=socket.gethostname(),
                      help="this node's ID (direct mode; default: host name)")
    for p in (push, rest):
        add_common_flags(p)
        p.add_argument("--docker-config", default=None, help="docker config JSON with the registry's credentials")
        p.add_argument("--export-socket", default="", help="the export service's socket (default: export.sock next "
                                                           "to the CSI socket)")
        p.add_argument("--driver", choices=sorted(DRIVER_CLASSES), default=None,
                       help="direct mode: the driver (default: the one holding state under the root)")
        p.add_argument("--storage-opt", action="append", default=[], metavar="KEY=VALUE",
                       help="direct mode: driver option, as strata serve's")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    root = Path(args.root).absolute()
    csi_sock = socket_of(root, args.endpoint)
    export_sock = Path(args.export_socket).absolute() if args.export_socket else export_socket_path(csi_sock)
    progress = renderer_for(sys.stderr)
    try:
        credentials = _credentials(args.docker_config)
        max_layer = parse_size(args.max_layer_bytes) if getattr(args, "max_layer_bytes", None) else None
        if plugin_serving(csi_sock) or plugin_serving(export_sock):
            if not plugin_serving(export_sock):
                print(f"strata backup: a plugin serves {csi_sock} but no export service answers on {export_sock}",
                      file=sys.stderr)
                return 1
            log.info("through the plugin's export service on %s", export_sock)
            with grpc.insecure_channel(f"unix://{export_sock}") as channel:
                if args.action == "push":
                    answer = push_remote(channel, root, args.snapshot, args.to, credentials=credentials,
                                         compression=args.compression, progress=progress, max_layer_bytes=max_layer)
                else:
                    with grpc.insecure_channel(f"unix://{csi_sock}") as csi_channel:
                        answer = restore_remote(channel, csi_channel, args.reference, credentials=credentials,
                                                volume_name=args.volume_name, progress=progress)
        else:
            options = dict(o.partition("=")[::2] for o in args.storage_opt)
            drv = open_driver(root, args.driver, options)
            log.info("directly on %s (driver %s)", root, drv.name)
            # no drv.cleanup() afterwards: it would release the mounts of volumes pods still use
            with direct_session(root, drv):
                if args.action == "push":
                    answer = push_direct(drv, root, args.snapshot, args.to, credentials=credentials,
                                         compression=args.compression, progress=progress, max_layer_bytes=max_layer)
                else:
                    answer = restore_direct(drv, root, args.reference, credentials=credentials,
                                            volume_name=args.volume_name, node_id=args.node_id, progress=progress)
    except StrataError as exc:
        print(f"strata backup {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, sort_keys=True))
    return 0
