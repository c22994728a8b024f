"""Backup: a frozen layer (a snapshot) and its chain, written to a target as one OCI artifact.

Contract of :func:`backup`:

* The snapshot must be a visible frozen layer.
* **Incremental over an earlier backup** (with an export index): the base is the newest
  snapshot P that was already written to this same location with the same layer media type
  (an :class:`~csi.backup.index.ArtifactRecord`), that still exists here unchanged (same
  ``created``), is older than the snapshot, and is a snapshot of the same volume
  (``Layer.origin``) or a visible ancestor of the snapshot. The artifact is then P's recorded
  layers, unchanged and not re-sent (each blob is checked with ``HEAD``; if one is missing the
  next candidate, or a full backup, is taken), plus ``driver.diff(snapshot, P)`` as new layers
  (split under ``max_layer_bytes`` as below). So the daily snapshots of one volume — siblings
  on vfs, btrfs and devicemapper, whose frozen layers all have the volume's parent as parent —
  back up incrementally, and keep doing so when older snapshots are deleted here (rotation):
  P's own ancestors need not exist any more, and an uploaded snapshot's layers never change.
  Applying the layers in order gives the snapshot's tree (the diff against P carries
  whiteouts for what was deleted since P). Correctness never depends on how P relates to the
  snapshot — any two trees diff correctly — only the size of the new layer does. A snapshot
  backed up again to the same location reuses its own recorded layers.
* **Capped**: at most ``max_increments`` (:data:`MAX_INCREMENTS`, 32) incremental backups are
  stacked on one full backup; the next one is full again, so a restore never applies more than
  that many diffs on top of a full one. ``max_increments=0`` always backs up in full.
* **Full backup** (no usable base): the chain is walked oldest first; each *visible* frozen
  ancestor becomes one artifact layer, ``driver.diff(layer, previous visible ancestor)`` (a
  hidden ancestor — a deleted snapshot that still has children — is folded into the next
  visible layer's diff, since the contract diffs visible layers only).
* A layer whose blob digest is known from the export cache (:class:`~csi.backup.index.ExportIndex`)
  and that the target already has (``HEAD``), or can mount from another repository of the same
  registry, is not produced nor sent: the second backup of a volume moves only the new layers.
* Otherwise the diff is streamed: tar -> sha256 (diff_id) -> optional zstd -> target, the blob
  digest computed on the fly; nothing is staged on disk. The target verifies nothing is stored
  under a wrong digest (layout: rename after hashing; registry: digest at the final PUT).
* Config and manifest (:mod:`csi.backup.media`) are written last; the manifest is put by digest
  and, if given, by tag. Only then is the backup complete — and recorded as the snapshot's
  artifact at this location: a kill before leaves blobs that the next backup reuses and no
  manifest.

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

from csi.backup.index import ArtifactRecord, ExportIndex, ExportRecord
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
MAX_INCREMENTS = 32  # incremental backups stacked on one full one (see the module docstring)


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


def _snapshot(driver: Driver, snapshot_id: str) -> Layer:
    """The frozen filesystem layer to back up (else InvalidArgument / Unsupported)."""
    top = driver.layer(snapshot_id)
    if not top.frozen:
        raise InvalidArgument(f"layer {snapshot_id} is writable: back up a snapshot (a frozen layer)")
    if top.block:
        raise Unsupported(f"layer {snapshot_id} is a raw block layer: its content has no files to put in a layer tar")
    return top


def _chain_ids(driver: Driver, top: Layer) -> list[str]:
    """The snapshot and its ancestors, nearest first (hidden ones included where the driver
    lists them)."""
    chain_of = getattr(driver, "chain", None)
    if chain_of is not None:
        return [l.id for l in chain_of(top.id)]
    ids, current = [], top  # the bare contract: stop at the first ancestor that is not visible
    while True:
        ids.append(current.id)
        if current.parent is None or not driver.exists(current.parent):
            return ids
        current = driver.layer(current.parent)


def export_chain(driver: Driver, snapshot_id: str) -> list[tuple[Layer, str | None]]:
    """``[(layer, base_id)]`` oldest first: the visible frozen layers of the snapshot's chain,
    each with the visible ancestor it is diffed against (see the module docstring)."""
    top = _snapshot(driver, snapshot_id)
    visible = [driver.layer(i) for i in reversed(_chain_ids(driver, top)) if driver.exists(i)]
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


def _backup_layer(driver: Driver, layer: Layer, base: str | None, media_type: str, target: Target, meter: Meter,
                  index: ExportIndex | None, max_layer_bytes: int | None,
                  location: str) -> tuple[list[LayerFacts], int, int]:
    """One diff (``layer`` against ``base``) as one or more artifact layers: (facts, sent, skipped).
    A blob the export cache knows and the target has is not produced."""
    if max_layer_bytes is not None:
        done = _split_layer(driver, layer, base, media_type, target, meter, index, max_layer_bytes, location)
        if done is not None:
            return done
    rec = index.lookup(layer.id, base, media_type, layer.created) if index else None
    if rec is not None:
        meter.add_total(rec.size)
        if target.has_blob(rec.digest) or target.mount_blob(rec.digest, list(rec.locations)):
            meter.skip(rec.digest, rec.size)
            if index and location not in rec.locations:
                index.record(ExportRecord(**{**rec.__dict__, "locations": (location,)}))
            return [LayerFacts(layer.id, rec.diff_id, Descriptor(media_type, rec.digest, rec.size))], 0, 1
    else:
        meter.add_total(None)
    meter.begin(layer.id, rec.size if rec else None)
    digest, diff_id, size = _stream_layer(driver, layer, base, media_type, target, meter)
    meter.end_blob(digest)
    log.info("backup of layer %s: blob %s, %d bytes", layer.id, digest, size)
    if index:
        index.record(ExportRecord(layer.id, base, layer.created, media_type, digest, diff_id, size, (location,)))
    return [LayerFacts(layer.id, diff_id, Descriptor(media_type, digest, size))], 1, 0


def _present(driver: Driver, rec: ArtifactRecord) -> Layer | None:
    """The recorded snapshot when it still exists here unchanged (a frozen layer, same ``created``)."""
    if not driver.exists(rec.layer_id):
        return None
    layer = driver.layer(rec.layer_id)
    return layer if layer.frozen and layer.created == rec.created else None


def older_sibling(snapshot: Layer, base: Layer) -> bool:
    """``base`` is an older frozen snapshot of the volume ``snapshot`` was taken of (the same
    ``Layer.origin``): a base a snapshot may be diffed against besides its ancestors."""
    return (base.frozen and base.id != snapshot.id and snapshot.origin is not None
            and base.origin == snapshot.origin and base.created < snapshot.created)


def incremental_base(driver: Driver, top: Layer, index: ExportIndex, location: str, media_type: str,
                     target: Target, max_increments: int = MAX_INCREMENTS) -> ArtifactRecord | None:
    """The earlier backup at ``location`` the snapshot ``top`` is written on top of (see the
    module docstring): its own, else the newest one of the same volume or of an ancestor whose
    blobs the target still has — unless that one has ``max_increments`` stacked already; None
    for a full backup."""
    records = index.artifacts(location, media_type)
    own = [r for r in records if r.layer_id == top.id and r.increments <= max_increments
           and _present(driver, r) is not None]
    ancestors: set[str] | None = None
    candidates: list[tuple[float, ArtifactRecord]] = []
    for rec in records:
        base = _present(driver, rec) if rec.layer_id != top.id else None
        if base is None or base.created >= top.created:
            continue
        if not older_sibling(top, base):
            if ancestors is None:
                ancestors = set(_chain_ids(driver, top)[1:])
            if base.id not in ancestors:
                continue
        candidates.append((base.created, rec))
    candidates.sort(key=lambda c: (c[0], c[1].layer_id), reverse=True)
    for rec in [*own, *(r for _, r in candidates)]:
        missing = next((l.blob.digest for l in rec.layers if not target.has_blob(l.blob.digest)), None)
        if missing is not None:
            log.info("backup of %s: the earlier backup of %s at %s lacks blob %s there; not building on it", top.id,
                     rec.layer_id, location, missing)
            continue
        if rec.layer_id != top.id and rec.increments >= max_increments:
            log.info("backup of %s: %d incremental backups are stacked on the last full one at %s; a full one "
                     "again", top.id, rec.increments, location)
            return None
        return rec
    return None


def backup(driver: Driver, snapshot_id: str, target: Target, *, tag: str | None = None,
           facts: VolumeFacts | None = None, index: ExportIndex | None = None, compression: str = "none",
           progress: ProgressCallback | None = None, created: str | None = None,
           max_layer_bytes: int | None = None, max_increments: int = MAX_INCREMENTS) -> BackupResult:
    """Write the snapshot to ``target``, incrementally over an earlier backup of the same volume
    there when one is usable, else its whole chain (see the module docstring)."""
    if max_layer_bytes is not None and max_layer_bytes < 4096:
        raise InvalidArgument(f"max_layer_bytes must be at least 4096, got {max_layer_bytes}")
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    if max_increments < 0:
        raise InvalidArgument(f"max_increments must be 0 or more, got {max_increments}")
    media_type = COMPRESSIONS[compression]
    facts = facts or VolumeFacts(driver=getattr(driver, "name", ""))
    created = created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    top = _snapshot(driver, snapshot_id)
    meter = Meter("backup", progress, total=0)
    location = target.location()
    facts_out: list[LayerFacts] = []
    sent = skipped = increments = 0
    base = incremental_base(driver, top, index, location, media_type, target, max_increments) if index else None
    if base is not None:
        for layer in base.layers:  # already at the target (checked): not produced, not sent
            meter.add_total(layer.blob.size)
            meter.skip(layer.blob.digest, layer.blob.size)
        facts_out.extend(base.layers)
        skipped += len(base.layers)
        increments = base.increments
        if base.layer_id != top.id:
            log.info("backup of %s: incremental over the backup of %s at %s (%d layers)", top.id, base.layer_id,
                     location, len(base.layers))
            new, n_sent, n_skipped = _backup_layer(driver, top, base.layer_id, media_type, target, meter, index,
                                                   max_layer_bytes, location)
            facts_out.extend(new)
            sent, skipped, increments = sent + n_sent, skipped + n_skipped, increments + 1
    else:
        for layer, parent in export_chain(driver, top.id):
            new, n_sent, n_skipped = _backup_layer(driver, layer, parent, media_type, target, meter, index,
                                                   max_layer_bytes, location)
            facts_out.extend(new)
            sent, skipped = sent + n_sent, skipped + n_skipped
    config = build_config(facts, facts_out, created)
    config_desc = Descriptor(CONFIG, digest_bytes(config), len(config))
    if not target.has_blob(config_desc.digest):
        target.put_blob(io.BytesIO(config), expected=config_desc.digest)
        meter.advance(len(config))
    annotations = {ANNOTATION_CREATED: created, **{k: v for k, v in facts.labels().items() if k.startswith(LABEL_PREFIX)}}
    manifest = build_manifest(config_desc, facts_out, annotations)
    digest = target.put_manifest(manifest, tag)
    meter.advance(len(manifest))
    if index:
        index.record_artifact(ArtifactRecord(top.id, top.created, location, media_type, tuple(facts_out),
                                             increments, digest))
    meter.finish()
    return BackupResult(digest, len(manifest), location, tag, tuple(facts_out), meter.done, sent, skipped)
