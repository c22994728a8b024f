"""Restore: an artifact named by digest becomes a chain of local frozen layers.

Contract of :func:`restore`:

1. The manifest is fetched by digest and verified; the config blob likewise; both are
   validated (:func:`csi.backup.media.parse_manifest` / ``parse_config``): an OCI image manifest,
   an image config with one diff_id per layer, layer media types strata reads.
2. Layer *i* is the local frozen layer ``oci-<ChainID(0..i)>`` (:mod:`csi.backup.index`). Going
   up from the bottom, a layer this node has is reused: an imported one, or — with the export
   cache — the very layer the backup was made from, when the cache says its diff has this
   diff_id. Nothing is pulled for them; a second restore of the same artifact pulls nothing.
3. Each missing layer is imported through the contract: ``create(ocitmp-<random>, parent)``
   (the bottom layer, which holds the whole volume, with the artifact's capacity as its size:
   on devicemapper a layer without one gets the pool's base size, too small for a bigger
   volume's data),
   ``apply_diff`` of the blob streamed from the target (decompressed on the fly for zstd) while
   both the blob digest and the diff_id are computed, the rest of the stream drained and both
   digests checked, then ``freeze(tmp, oci-<chain id>)`` and ``remove(tmp)``. The final ID exists
   only after verification; on any failure the temporary layer is removed, and after a kill -9
   it is a layer :func:`~csi.backup.index.sweep_temporaries` removes at start-up.
4. The result names the top layer: ``driver.create(volume, parent=result.layer_id, ...)`` makes
   the volume (the caller does that, with ``result.artifact.facts.capacity_bytes``).
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from typing import IO

from csi.backup.index import ExportIndex, ExportRecord, imported_layer_id, temp_layer_id
from csi.backup.media import (LAYER_TAR, LAYER_TAR_GZIP, LAYER_TAR_ZSTD, Artifact, Descriptor, HashingReader, chain_id, check_digest,
                              parse_config, parse_manifest)
from csi.backup.progress import Meter, MeteredReader, ProgressCallback
from csi.backup.target import Target, VerifyingReader
from csi.errors import AlreadyExists, DigestMismatch, InvalidArgument, NotFound
from csi.graphdriver import CreateOpts, Driver

log = logging.getLogger(__name__)

CONFIG_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class RestoreResult:
    layer_id: str  # the top frozen layer: the parent of the restored volume
    artifact: Artifact
    imported: tuple[str, ...]  # layers made by this restore
    reused: tuple[str, ...]  # layers this node already had
    bytes_pulled: int


def read_artifact(target: Target, digest: str) -> Artifact:
    """The verified, validated manifest and config of the artifact ``digest``."""
    check_digest(digest, "artifact digest")
    data, _ = target.get_manifest(digest)
    config, layers = parse_manifest(data)
    if config.size > CONFIG_MAX_BYTES:
        raise InvalidArgument(f"backup config of {config.size} bytes is larger than {CONFIG_MAX_BYTES}")
    reader = target.open_blob(config.digest, config.size)
    try:
        raw = reader.read(CONFIG_MAX_BYTES + 1)
        reader.read(1)  # end of stream: verifies the digest
    finally:
        reader.close()
    diff_ids, facts, sources = parse_config(raw, layers)
    return Artifact(digest, config, layers, diff_ids, facts, sources)


def _original(driver: Driver, index: ExportIndex | None, art: Artifact, i: int, parent: str | None) -> str | None:
    """The layer the backup was made from, when this node still has it unchanged."""
    if index is None or i >= len(art.source_layer_ids):
        return None
    source = art.source_layer_ids[i]
    base = art.source_layer_ids[i - 1] if i > 0 else None
    if base != parent or not driver.exists(source):
        return None
    layer = driver.layer(source)
    if not layer.frozen:
        return None
    rec = index.lookup(source, base, art.layers[i].media_type, layer.created)
    return source if rec is not None and rec.diff_id == art.diff_ids[i] else None


def create_import_layer(driver: Driver, layer_id: str, parent: str | None, capacity: int | None) -> None:
    """Create the layer a diff is imported into: a bottom one (no parent) holds the whole volume,
    so it is made as big as the backup's capacity says (when it says one)."""
    driver.create(layer_id, parent, CreateOpts(size_bytes=capacity) if parent is None and capacity else None)


def _import(driver: Driver, target: Target, desc: Descriptor, diff_id: str, parent: str | None, final: str,
            meter: Meter, capacity: int | None = None) -> None:
    if desc.media_type == LAYER_TAR and desc.digest != diff_id:
        raise DigestMismatch(f"layer {desc.digest} is an uncompressed tar, but the config gives it the diff_id "
                             f"{diff_id}: the artifact is inconsistent")
    tmp = temp_layer_id()
    create_import_layer(driver, tmp, parent, capacity)
    try:
        blob = target.open_blob(desc.digest, desc.size)
        try:
            counted = MeteredReader(blob, meter)
            stream: IO[bytes] = counted  # type: ignore[assignment]
            if desc.media_type == LAYER_TAR_ZSTD:
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(counted, closefd=False)  # type: ignore[assignment]
            elif desc.media_type == LAYER_TAR_GZIP:
                stream = gzip.GzipFile(fileobj=counted, mode="rb")  # type: ignore[assignment]
            # an uncompressed blob is its own tar: verifying the blob verifies the diff_id (one hash)
            tar = None if desc.media_type == LAYER_TAR else HashingReader(stream)
            driver.apply_diff(tmp, parent, tar or stream)  # type: ignore[arg-type]
            if tar is not None:
                tar.drain()
            if isinstance(blob, VerifyingReader):
                blob.finish()
            else:  # a target that does not verify: read to the end ourselves is not possible
                raise InvalidArgument("target returned an unverified blob stream")
        finally:
            blob.close()
        if tar is not None and tar.digest() != diff_id:
            raise DigestMismatch(f"layer {desc.digest}: uncompressed content hashes to {tar.digest()}, "
                                 f"the config says {diff_id}")
        try:
            driver.freeze(tmp, final)
        except AlreadyExists:
            if not driver.exists(final):
                raise
    finally:
        try:
            driver.remove(tmp)
        except Exception:  # the start-up sweep removes it
            log.warning("could not remove the import layer %s", tmp, exc_info=True)


def restore(driver: Driver, target: Target, digest: str, *, index: ExportIndex | None = None,
            progress: ProgressCallback | None = None) -> RestoreResult:
    """Import the artifact ``digest`` from ``target`` (see the module docstring)."""
    art = read_artifact(target, digest)
    ids = [imported_layer_id(chain_id(list(art.diff_ids[: i + 1]))) for i in range(len(art.layers))]
    parent: str | None = None
    reused: list[str] = []
    start = 0
    for i, final in enumerate(ids):
        if driver.exists(final):
            parent = final
        else:
            original = _original(driver, index, art, i, parent)
            if original is None:
                break
            parent = original
        reused.append(parent)
        start = i + 1
    missing = range(start, len(ids))
    meter = Meter("restore", progress, total=sum(art.layers[i].size for i in missing))
    for i in range(start):
        meter.skip(art.layers[i].digest, art.layers[i].size)
    imported: list[str] = []
    for i in missing:
        desc, final = art.layers[i], ids[i]
        meter.begin(desc.digest, desc.size)
        if not driver.exists(final):  # a concurrent restore may have made it meanwhile
            _import(driver, target, desc, art.diff_ids[i], parent, final, meter, art.facts.capacity_bytes)
            imported.append(final)
            log.info("restore: imported blob %s as layer %s", desc.digest, final)
        meter.end_blob(desc.digest)
        if index is not None:
            layer = driver.layer(final)
            index.record(ExportRecord(final, parent, layer.created, desc.media_type, desc.digest, art.diff_ids[i],
                                      desc.size, (target.location(),)))
        parent = final
    if parent is None:
        raise NotFound(f"artifact {digest} has no layers")
    meter.finish()
    return RestoreResult(parent, art, tuple(imported), tuple(reused), meter.done)
