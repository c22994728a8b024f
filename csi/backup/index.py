"""What this node knows about its layers as OCI blobs: imported-layer names and the export cache.

**Imported layers are named by their OCI ChainID**: the frozen layer made from the i-th layer of
an artifact is ``oci-<hex of ChainID(diff_id_0..i)>`` (:func:`imported_layer_id`). A ChainID
names a diff *together with all the diffs below it*, which is exactly what a local layer's
content is, so "does this node have layer i?" is ``driver.exists(imported_layer_id(...))`` —
no separate digest->layer table can drift from the driver's records, and a second restore of
the same artifact finds every layer and pulls nothing. The writable layer an import applies its
diff to is ``ocitmp-<random>`` (:func:`temp_layer_id`); such a layer is never a result, so a
start-up sweep removes every layer whose ID :func:`is_temporary` (:func:`sweep_temporaries`:
call it before serving, never while restores run).

**The export cache** (:class:`ExportIndex`) remembers, for a frozen layer diffed against a base
(its visible ancestor), the digests of what was sent: ``diff_id`` (uncompressed) and the blob
digest per media type, plus where the blob was stored (``host/repository`` or layout path).
With it a second backup can ask the target ``HEAD <digest>`` (or mount it from a repository
that has it) *before* producing the diff, so an unchanged layer costs one request. Imported
layers are entered when they are made, so a restored chain backs up again without re-diffing.
A record carries the layer's ``created`` time and is ignored if the layer was re-created
under the same ID.

**Artifacts written** (:class:`ArtifactRecord`): for a snapshot backed up to a location
(``oci://host/repo`` or ``oci-layout:/path``, whatever the tag) with one layer media type,
the artifact layers its manifest lists, in order — each one's source layer, diff_id and blob
descriptor — and how many incremental backups are stacked in it since the last full one.
The next backup of a snapshot of the same volume to that location starts from them
(:mod:`csi.backup.export`), so the layers of an uploaded snapshot stay what they were even
after their own source layers are deleted here. Recorded only after the manifest is stored.

On-disk layout: one JSON file (the caller chooses where; the lead's wiring puts it at
``<driver home>/backup-index.json`` — it could move into the driver's metastore later)::

    {"version": 1,
     "records": {"<layer>|<base or ->|<media type>": {
        "layer_id", "base_id", "created", "media_type", "digest", "diff_id", "size",
        "locations": [...]}},
     "artifacts": {"<layer>|<location>|<media type>": {
        "layer_id", "created", "location", "media_type", "increments", "manifest",
        "layers": [{"source", "diff_id", "media_type", "digest", "size"}, ...]}}}

written atomically (temp file + fsync + rename) under an exclusive flock on ``<file>.lock``;
a lost update only costs a re-diff, never a wrong answer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from csi.backup.media import Descriptor, LayerFacts, check_digest
from csi.errors import InvalidArgument
from csi.graphdriver import Driver
from csi.ids import check_layer_id
from csi.host.atomicfile import write_atomic

log = logging.getLogger(__name__)

IMPORTED_PREFIX = "oci-"
TEMP_PREFIX = "ocitmp-"


def imported_layer_id(chain_id: str) -> str:
    """The local layer ID of an imported layer (see the module docstring)."""
    return check_layer_id(IMPORTED_PREFIX + check_digest(chain_id, "chain id").split(":", 1)[1])


def temp_layer_id() -> str:
    return check_layer_id(TEMP_PREFIX + secrets.token_hex(16))


def is_temporary(layer_id: str) -> bool:
    return layer_id.startswith(TEMP_PREFIX)


def sweep_temporaries(driver: Driver) -> list[str]:
    """Remove the writable layers half-done imports left (a kill -9 between create and remove),
    first dropping the mount references the killed import held (``apply_diff`` may ``get`` the
    layer, and the driver persists reference counts). Returns their IDs. Must not run while an
    import is in progress."""
    removed = []
    for layer in driver.layers():
        if is_temporary(layer.id):
            log.info("removing the leftover import layer %s", layer.id)
            for _ in range(layer.mounts):
                driver.put(layer.id)
            driver.remove(layer.id)
            removed.append(layer.id)
    return removed


@dataclass(frozen=True)
class ExportRecord:
    """A frozen layer's diff against ``base_id`` as one blob of ``media_type``."""

    layer_id: str
    base_id: str | None
    created: float
    media_type: str
    digest: str
    diff_id: str
    size: int
    locations: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return _key(self.layer_id, self.base_id, self.media_type)


def _key(layer_id: str, base_id: str | None, media_type: str) -> str:
    return f"{layer_id}|{base_id or '-'}|{media_type}"


@dataclass(frozen=True)
class ArtifactRecord:
    """Snapshot ``layer_id`` as written to ``location``: its manifest's layers, in order."""

    layer_id: str
    created: float
    location: str
    media_type: str  # the layer media type the backup asked for (its compression)
    layers: tuple[LayerFacts, ...]
    increments: int  # incremental backups stacked since the last full one (0: a full backup)
    manifest: str  # the manifest's digest (for people reading the file)

    @property
    def key(self) -> str:
        return _artifact_key(self.layer_id, self.location, self.media_type)

    def to_json(self) -> dict[str, Any]:
        return {"layer_id": self.layer_id, "created": self.created, "location": self.location,
                "media_type": self.media_type, "increments": self.increments, "manifest": self.manifest,
                "layers": [{"source": l.layer_id, "diff_id": l.diff_id, "media_type": l.blob.media_type,
                            "digest": l.blob.digest, "size": l.blob.size} for l in self.layers]}

    @classmethod
    def from_json(cls, raw: object) -> ArtifactRecord | None:
        """The record, or None for anything malformed (a lost record only costs a full backup)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), list):
            return None
        try:
            layers = tuple(LayerFacts(str(l["source"]), check_digest(l["diff_id"]),
                                      Descriptor(str(l["media_type"]), check_digest(l["digest"]), int(l["size"])))
                           for l in raw["layers"])
            rec = cls(str(raw["layer_id"]), float(raw["created"]), str(raw["location"]), str(raw["media_type"]),
                      layers, int(raw["increments"]), str(raw.get("manifest", "")))
        except (KeyError, TypeError, ValueError, InvalidArgument):  # InvalidArgument: a malformed digest
            return None
        return rec if rec.layers and rec.increments >= 0 else None


def _artifact_key(layer_id: str, location: str, media_type: str) -> str:
    return f"{layer_id}|{location}|{media_type}"


class ExportIndex:
    """The export cache in one JSON file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._guard = threading.Lock()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._guard:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _load_all(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """(diff records, artifact records) of the file; empty when missing or unreadable."""
        try:
            obj = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}, {}
        except ValueError:
            log.warning("backup index %s is unreadable; starting afresh", self.path)
            return {}, {}
        if not isinstance(obj, dict):
            return {}, {}
        records, artifacts = obj.get("records"), obj.get("artifacts")
        return (records if isinstance(records, dict) else {}), (artifacts if isinstance(artifacts, dict) else {})

    def _load(self) -> dict[str, dict[str, Any]]:
        return self._load_all()[0]

    def _save(self, records: dict[str, dict[str, Any]], artifacts: dict[str, dict[str, Any]]) -> None:
        write_atomic(self.path, json.dumps({"version": 1, "records": records, "artifacts": artifacts},
                                           sort_keys=True))

    def lookup(self, layer_id: str, base_id: str | None, media_type: str, created: float) -> ExportRecord | None:
        """The record for this diff, or None (unknown, or the layer was re-created since)."""
        with self._locked():
            raw = self._load().get(_key(layer_id, base_id, media_type))
        if not isinstance(raw, dict):
            return None
        try:
            rec = ExportRecord(**{**raw, "locations": tuple(raw.get("locations", ()))})
            check_digest(rec.digest)
            check_digest(rec.diff_id)
        except (TypeError, ValueError, InvalidArgument):  # InvalidArgument: a malformed digest
            return None
        return rec if rec.created == created else None

    def record(self, rec: ExportRecord) -> None:
        with self._locked():
            records, artifacts = self._load_all()
            old = records.get(rec.key)
            if isinstance(old, dict) and old.get("digest") == rec.digest:
                merged = tuple(dict.fromkeys([*old.get("locations", ()), *rec.locations]))
                rec = replace(rec, locations=merged)
            records[rec.key] = {**asdict(rec), "locations": list(rec.locations)}
            self._save(records, artifacts)

    def record_artifact(self, rec: ArtifactRecord) -> None:
        """Remember what snapshot ``rec.layer_id`` was written to ``rec.location`` as (replacing
        an earlier record of the same snapshot, location and media type)."""
        with self._locked():
            records, artifacts = self._load_all()
            artifacts[rec.key] = rec.to_json()
            self._save(records, artifacts)

    def artifacts(self, location: str, media_type: str) -> list[ArtifactRecord]:
        """Every artifact record of ``location`` and ``media_type`` (the caller checks that
        each one's snapshot still exists with the recorded ``created`` time)."""
        with self._locked():
            raw = self._load_all()[1]
        found = (ArtifactRecord.from_json(v) for v in raw.values())
        return [r for r in found if r is not None and r.location == location and r.media_type == media_type]

    def forget_missing(self, driver: Driver) -> int:
        """Drop records (diffs and artifacts) of layers the driver no longer has; returns how many."""
        with self._locked():
            records, artifacts = self._load_all()
            keep = {k: v for k, v in records.items()
                    if isinstance(v, dict) and driver.exists(str(v.get("layer_id", "")))}
            kept = {k: v for k, v in artifacts.items()
                    if isinstance(v, dict) and driver.exists(str(v.get("layer_id", "")))}
            dropped = len(records) - len(keep) + len(artifacts) - len(kept)
            if dropped:
                self._save(keep, kept)
            return dropped
