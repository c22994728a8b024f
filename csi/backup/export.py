"""Backup: a frozen layer (a snapshot) and its chain, written to a target as one OCI artifact.

Contract of :func:`backup`:

* The snapshot must be a visible frozen layer. Its chain is walked oldest first; each *visible*
  frozen ancestor becomes one artifact layer, ``driver.diff(layer, previous visible ancestor)``
  (a hidden ancestor — a deleted snapshot that still has children — is folded into the next
  visible layer's diff, since the contract diffs visible layers only).
* A layer whose blob digest is known from the export cache (:class:`~csi.backup.index.ExportIndex`)
  and that the target already has (``HEAD``), or can mount from another repository of the same
  registry, is not produced nor sent: the second backup of a volume moves only the new layers.
* Otherwise the diff is streamed: tar -> sha256 (diff_id) -> optional zstd -> target, the blob
  digest computed on the fly; nothing is staged on disk. The target verifies nothing is stored
  under a wrong digest (layout: rename after hashing; registry: digest at the final PUT).
* Config and manifest (:mod:`csi.backup.media`) are written last; the manifest is put by digest
  and, if given, by tag. Only then is the backup complete: a kill before leaves blobs that the
  next backup reuses and no manifest.

* With ``max_layer_bytes`` (a registry's layer limit), a diff whose tar is larger than that
  (``driver.diff_size``, when the driver has it; otherwise always checked) is split into
  several artifact layers on file boundaries (:mod:`csi.backup.split`: markers in the first
  part, hard-link groups kept in one part, directory entries repeated where later parts add
  to them). The diff is read twice — once to plan the cut, once to send — and nothing is
  staged on disk. A restore applies the parts in order like any layers (each becomes a frozen
  layer on the restoring node); ``umoci unpack`` gives the same tree. The export cache
  remembers the parts of a split layer under the limit it was split for.

Returns a :class:`BackupResult` whose ``reference`` (``…@sha256:…``) is what a restore takes.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO

from csi.backup.index import ExportIndex, ExportRecord
from csi.backup.media import (ANNOTATION_CREATED, CONFIG, LABEL_PREFIX, LAYER_TAR, LAYER_TAR_ZSTD, Descriptor,
                              HashingReader, LayerFacts, VolumeFacts, build_config, build_manifest, digest_bytes)
from csi.backup.progress import Meter, MeteredReader, ProgressCallback
from csi.backup.split import Part, part_streams, plan_parts
from csi.backup.target import Target
from csi.errors import InvalidArgument, Unsupported
from csi.graphdriver import Driver, Layer

log = logging.getLogger(__name__)

COMPRESSIONS = {"none": LAYER_TAR, "zstd": LAYER_TAR_ZSTD}
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class BackupResult:
    manifest_digest: str
    manifest_size: int
    location: str  # the target's location (oci://host/repo or oci-layout:/path)
    tag: str | None
    layers: tuple[LayerFacts, ...]
    bytes_sent: int  # blob bytes this backup moved (layers + config + manifest)
    blobs_sent: int
    blobs_skipped: int

    @property
    def reference(self) -> str:
        """The immutable reference a restore takes."""
        return f"{self.location}@{self.manifest_digest}"


def export_chain(driver: Driver, snapshot_id: str) -> list[tuple[Layer, str | None]]:
    """``[(layer, base_id)]`` oldest first: the visible frozen layers of the snapshot's chain,
    each with the visible ancestor it is diffed against (see the module docstring)."""
    top = driver.layer(snapshot_id)
    if not top.frozen:
        raise InvalidArgument(f"layer {snapshot_id} is writable: back up a snapshot (a frozen layer)")
    if top.block:
        raise Unsupported(f"layer {snapshot_id} is a raw block layer: its content has no files to put in a layer tar")
    chain_of = getattr(driver, "chain", None)
    if chain_of is not None:
        ids = [l.id for l in chain_of(snapshot_id)]
    else:  # the bare contract: stop at the first ancestor that is not visible
        ids, current = [], top
        while True:
            ids.append(current.id)
            if current.parent is None or not driver.exists(current.parent):
                break
            current = driver.layer(current.parent)
    visible = [driver.layer(i) for i in reversed(ids) if driver.exists(i)]
    out: list[tuple[Layer, str | None]] = []
    base: str | None = None
    for layer in visible:
        out.append((layer, base))
        base = layer.id
    return out


def _store(raw: IO[bytes], media_type: str, target: Target, meter: Meter) -> tuple[str, str, int]:
    """Hash, compress and store one layer tar; returns (digest, diff_id, size)."""
    tar = HashingReader(raw)
    source: IO[bytes] = tar  # type: ignore[assignment]
    if media_type == LAYER_TAR_ZSTD:
        import zstandard

        source = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_reader(tar, closefd=False)  # type: ignore[assignment]
    digest, size = target.put_blob(MeteredReader(source, meter))  # type: ignore[arg-type]
    tar.drain()
    return digest, tar.digest(), size


def _stream_layer(driver: Driver, layer: Layer, base: str | None, media_type: str, target: Target,
                  meter: Meter) -> tuple[str, str, int]:
    """Diff, hash, compress and store one layer; returns (digest, diff_id, size)."""
    raw = driver.diff(layer.id, base)
    try:
        return _store(raw, media_type, target, meter)
    finally:
        raw.close()


def _plan(driver: Driver, layer: Layer, base: str | None, max_layer_bytes: int) -> list[Part] | None:
    """The parts of a diff larger than the limit, or None when it fits in one layer."""
    sized = getattr(driver, "diff_size", None)
    if sized is not None and sized(layer.id, base) <= max_layer_bytes:
        return None
    raw = driver.diff(layer.id, base)
    try:
        parts = plan_parts(raw, max_layer_bytes)
    finally:
        raw.close()
    for i, part in enumerate(parts):
        if part.oversized:
            log.warning("backup of layer %s: part %d of %d is %d bytes, over the %d-byte limit: %s", layer.id, i + 1,
                        len(parts), part.size, max_layer_bytes, part.oversized)
    return parts if len(parts) > 1 else None


def _split_key(media_type: str, max_layer_bytes: int, part: int | None) -> str:
    """The export cache's media-type key of one part of a split diff (``None``: the count)."""
    return f"{media_type};split={max_layer_bytes};part={'count' if part is None else part}"


def _cached_parts(index: ExportIndex, layer: Layer, base: str | None, media_type: str,
                  max_layer_bytes: int) -> list[ExportRecord] | None:
    count = index.lookup(layer.id, base, _split_key(media_type, max_layer_bytes, None), layer.created)
    if count is None:
        return None
    found = [index.lookup(layer.id, base, _split_key(media_type, max_layer_bytes, i), layer.created)
             for i in range(count.size)]
    return None if any(r is None for r in found) else found  # type: ignore[return-value]


def _stream_parts(driver: Driver, layer: Layer, base: str | None, parts: list[Part], media_type: str,
                  target: Target, meter: Meter) -> list[tuple[str, str, int]]:
    raw = driver.diff(layer.id, base)
    try:
        return [_store(stream, media_type, target, meter) for stream in part_streams(raw, parts)]
    finally:
        raw.close()


def _split_layer(driver: Driver, layer: Layer, base: str | None, media_type: str, target: Target, meter: Meter,
                 index: ExportIndex | None, max_layer_bytes: int,
                 location: str) -> tuple[list[LayerFacts], int, int] | None:
    """Back up one layer as several parts when its diff is over the limit: (facts, sent,
    skipped), or None when it fits in one layer (the caller backs it up as usual)."""
    cached = _cached_parts(index, layer, base, media_type, max_layer_bytes) if index else None
    if cached is not None and all(target.has_blob(r.digest) or target.mount_blob(r.digest, list(r.locations))
                                  for r in cached):
        for r in cached:
            meter.add_total(r.size)
            meter.skip(r.digest, r.size)
        return [LayerFacts(layer.id, r.diff_id, Descriptor(media_type, r.digest, r.size)) for r in cached], 0, len(cached)
    parts = _plan(driver, layer, base, max_layer_bytes)
    if parts is None:
        return None
    for part in parts:
        meter.add_total(part.size if media_type == LAYER_TAR else None)
    meter.begin(layer.id, sum(p.size for p in parts) if media_type == LAYER_TAR else None)
    stored = _stream_parts(driver, layer, base, parts, media_type, target, meter)
    facts = []
    for i, (digest, diff_id, size) in enumerate(stored):
        meter.end_blob(digest)
        facts.append(LayerFacts(layer.id, diff_id, Descriptor(media_type, digest, size)))
        if index:
            index.record(ExportRecord(layer.id, base, layer.created, _split_key(media_type, max_layer_bytes, i),
                                      digest, diff_id, size, (location,)))
    if index:
        last = stored[-1]
        index.record(ExportRecord(layer.id, base, layer.created, _split_key(media_type, max_layer_bytes, None),
                                  last[0], last[1], len(stored), (location,)))
    log.info("backup of layer %s: %d parts of at most %d bytes", layer.id, len(stored), max_layer_bytes)
    return facts, len(stored), 0


def backup(driver: Driver, snapshot_id: str, target: Target, *, tag: str | None = None,
           facts: VolumeFacts | None = None, index: ExportIndex | None = None, compression: str = "none",
           progress: ProgressCallback | None = None, created: str | None = None,
           max_layer_bytes: int | None = None) -> BackupResult:
    """Write the snapshot's chain to ``target`` (see the module docstring)."""
    if max_layer_bytes is not None and max_layer_bytes < 4096:
        raise InvalidArgument(f"max_layer_bytes must be at least 4096, got {max_layer_bytes}")
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    media_type = COMPRESSIONS[compression]
    facts = facts or VolumeFacts(driver=getattr(driver, "name", ""))
    created = created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    chain = export_chain(driver, snapshot_id)
    meter = Meter("backup", progress, total=0)
    location = target.location()
    facts_out: list[LayerFacts] = []
    sent = skipped = 0
    for layer, base in chain:
        if max_layer_bytes is not None:
            done = _split_layer(driver, layer, base, media_type, target, meter, index, max_layer_bytes, location)
            if done is not None:
                facts_out.extend(done[0])
                sent += done[1]
                skipped += done[2]
                continue
        rec = index.lookup(layer.id, base, media_type, layer.created) if index else None
        if rec is not None:
            meter.add_total(rec.size)
            if target.has_blob(rec.digest) or target.mount_blob(rec.digest, list(rec.locations)):
                meter.skip(rec.digest, rec.size)
                skipped += 1
                facts_out.append(LayerFacts(layer.id, rec.diff_id, Descriptor(media_type, rec.digest, rec.size)))
                if index and location not in rec.locations:
                    index.record(ExportRecord(**{**rec.__dict__, "locations": (location,)}))
                continue
        else:
            meter.add_total(None)
        meter.begin(layer.id, rec.size if rec else None)
        digest, diff_id, size = _stream_layer(driver, layer, base, media_type, target, meter)
        meter.end_blob(digest)
        sent += 1
        log.info("backup of layer %s: blob %s, %d bytes", layer.id, digest, size)
        facts_out.append(LayerFacts(layer.id, diff_id, Descriptor(media_type, digest, size)))
        if index:
            index.record(ExportRecord(layer.id, base, layer.created, media_type, digest, diff_id, size, (location,)))
    config = build_config(facts, facts_out, created)
    config_desc = Descriptor(CONFIG, digest_bytes(config), len(config))
    if not target.has_blob(config_desc.digest):
        target.put_blob(io.BytesIO(config), expected=config_desc.digest)
        meter.advance(len(config))
    annotations = {ANNOTATION_CREATED: created, **{k: v for k, v in facts.labels().items() if k.startswith(LABEL_PREFIX)}}
    manifest = build_manifest(config_desc, facts_out, annotations)
    digest = target.put_manifest(manifest, tag)
    meter.advance(len(manifest))
    meter.finish()
    return BackupResult(digest, len(manifest), location, tag, tuple(facts_out), meter.done, sent, skipped)
