"""OCI values of a strata backup: media types, descriptors, digests, the manifest and config.

Artifact format (one per snapshot)::

    manifest  application/vnd.oci.image.manifest.v1+json, schemaVersion 2
      config  application/vnd.oci.image.config.v1+json   (a valid *image* config)
      layers  oldest first: one per frozen layer of the snapshot's chain, each
              driver.diff(layer, parent) — or, incrementally, the layers of an earlier
              snapshot's backup at the same place followed by driver.diff(snapshot, that
              snapshot) (:mod:`csi.backup.export`); each an OCI layer tar, uncompressed
              (application/vnd.oci.image.layer.v1.tar) or zstd
              (application/vnd.oci.image.layer.v1.tar+zstd); a restore also reads +gzip layers,
              which is what ``skopeo copy`` to a registry makes of uncompressed ones

Why an image config and not an artifactType with a custom config type: umoci (and every
image unpacker) refuses a manifest whose config is not ``application/vnd.oci.image.config.v1+json``
with ``rootfs.type == "layers"`` and one ``rootfs.diff_ids`` entry per layer — it checks each
uncompressed layer against its diff_id. The image-spec (1.1) makes ``artifactType`` only
*required* when the config is the empty descriptor, and such an artifact cannot be unpacked by
ordinary tools. So strata's facts are ``config.Labels`` (keys :data:`LABEL_PREFIX` ``*``), which
every tool carries through untouched, and are repeated as manifest annotations so that
``skopeo inspect`` shows them without fetching the config.

Digests are always ``sha256:<64 lowercase hex>`` (the only algorithm accepted here).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from csi.errors import InvalidArgument
from csi.host.pipestream import ReadStream

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"  # read only: what other tools re-push
LAYER_TYPES = (LAYER_TAR, LAYER_TAR_ZSTD, LAYER_TAR_GZIP)

LABEL_PREFIX = "dev.strata."
ANNOTATION_CREATED = "org.opencontainers.image.created"
FORMAT_VERSION = "1"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20


def check_digest(value: object, what: str = "digest") -> str:
    """``value`` if it is ``sha256:<64 lowercase hex>``, else InvalidArgument."""
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        raise InvalidArgument(f"{what} {str(value)[:80]!r} is malformed: expected sha256:<64 lowercase hex digits>")
    return value


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(diff_ids: list[str]) -> str:
    """The OCI ChainID of a stack of diff_ids (image-spec config.md): ChainID(L0) = DiffID(L0),
    ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln)). It names a layer *with* its
    parents, which is what a local layer is."""
    if not diff_ids:
        raise InvalidArgument("a chain has at least one layer")
    current = diff_ids[0]
    for diff_id in diff_ids[1:]:
        current = digest_bytes(f"{current} {diff_id}".encode("ascii"))
    return current


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{what} is not a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidArgument(f"{what} has no mediaType")
        check_digest(digest, f"{what} digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what} has no valid size")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise InvalidArgument(f"{what} annotations are not a string map")
        return cls(media_type, digest, size, annotations)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LayerFacts:
    """One layer of a backup: the local layer it came from and its two digests."""

    layer_id: str  # the local frozen layer (on the node that made the backup)
    diff_id: str  # sha256 of the uncompressed tar
    blob: Descriptor  # what is stored (compressed or not)


@dataclass(frozen=True)
class VolumeFacts:
    """What a restore needs to know about the volume besides its layers."""

    capacity_bytes: int | None = None
    driver: str = ""
    access_type: str = "filesystem"  # "filesystem" | "block"
    filesystem: str = ""
    source_names: Mapping[str, str] = field(default_factory=dict)  # e.g. {"snapshot": "ns/name"}

    def labels(self) -> dict[str, str]:
        out = {f"{LABEL_PREFIX}format": FORMAT_VERSION, f"{LABEL_PREFIX}access-type": self.access_type}
        if self.capacity_bytes is not None:
            out[f"{LABEL_PREFIX}capacity-bytes"] = str(self.capacity_bytes)
        if self.driver:
            out[f"{LABEL_PREFIX}driver"] = self.driver
        if self.filesystem:
            out[f"{LABEL_PREFIX}filesystem"] = self.filesystem
        for key, value in sorted(self.source_names.items()):
            out[f"{LABEL_PREFIX}source.{key}"] = value
        return out

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> VolumeFacts:
        cap = labels.get(f"{LABEL_PREFIX}capacity-bytes")
        if cap is not None and not cap.isdigit():
            raise InvalidArgument(f"backup config: capacity {cap[:40]!r} is not a byte count")
        prefix = f"{LABEL_PREFIX}source."
        return cls(capacity_bytes=int(cap) if cap is not None else None,
                   driver=labels.get(f"{LABEL_PREFIX}driver", ""),
                   access_type=labels.get(f"{LABEL_PREFIX}access-type", "filesystem"),
                   filesystem=labels.get(f"{LABEL_PREFIX}filesystem", ""),
                   source_names={k[len(prefix):]: v for k, v in labels.items() if k.startswith(prefix)})


def canonical(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces): the same facts give the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def build_config(facts: VolumeFacts, layers: list[LayerFacts], created: str) -> bytes:
    """A valid OCI image config carrying the facts as labels (see module docstring)."""
    labels = facts.labels()
    labels[f"{LABEL_PREFIX}layers"] = json.dumps([l.layer_id for l in layers], separators=(",", ":"))
    return canonical({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
        "history": [{"created": created, "created_by": f"strata backup of layer {l.layer_id}"} for l in layers],
    })


def build_manifest(config: Descriptor, layers: list[LayerFacts], annotations: Mapping[str, str]) -> bytes:
    return canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config.to_json(),
        "layers": [l.blob.to_json() for l in layers],
        "annotations": dict(annotations),
    })


@dataclass(frozen=True)
class Artifact:
    """A parsed, validated backup manifest and config."""

    manifest_digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    facts: VolumeFacts
    source_layer_ids: tuple[str, ...]


def parse_manifest(data: bytes) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """Config and layer descriptors of an OCI image manifest; anything else is InvalidArgument."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"backup manifest is not JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("schemaVersion") != 2:
        raise InvalidArgument("backup manifest is not an OCI manifest (schemaVersion 2)")
    if obj.get("mediaType", MANIFEST) != MANIFEST:
        raise InvalidArgument(f"backup manifest has media type {obj.get('mediaType')!r}, expected {MANIFEST}")
    config = Descriptor.from_json(obj.get("config"), "manifest config")
    if config.media_type != CONFIG:
        raise InvalidArgument(f"backup config has media type {config.media_type!r}, expected {CONFIG}")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise InvalidArgument("backup manifest has no layers")
    layers = tuple(Descriptor.from_json(l, f"layer {i}") for i, l in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"layer {i} has media type {layer.media_type!r}; strata reads {', '.join(LAYER_TYPES)}")
    return config, layers


def parse_config(data: bytes, layers: tuple[Descriptor, ...]) -> tuple[tuple[str, ...], VolumeFacts, tuple[str, ...]]:
    """diff_ids, facts and source layer ids of a backup config (validated against ``layers``)."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"backup config is not JSON: {exc}") from exc
    rootfs = obj.get("rootfs") if isinstance(obj, dict) else None
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument("backup config has no rootfs of type 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise InvalidArgument("backup config: rootfs.diff_ids must have one entry per manifest layer")
    for i, d in enumerate(diff_ids):
        check_digest(d, f"diff_id {i}")
    labels = (obj.get("config") or {}).get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidArgument("backup config labels are not a string map")
    source_ids: tuple[str, ...] = ()
    raw = labels.get(f"{LABEL_PREFIX}layers")
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            source_ids = tuple(parsed)
    return tuple(diff_ids), VolumeFacts.from_labels(labels), source_ids


class HashingReader(ReadStream):
    """Wraps a binary stream; counts and hashes what is read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hash.update(data)
            self.count += len(data)
        return data

    def close(self) -> None:
        self._raw.close()

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

