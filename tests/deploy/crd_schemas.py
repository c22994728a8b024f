"""JSON schemas for the custom-resource kinds strata ships, which kubernetes-validate lacks.

Written for these tests from the CRDs' published APIs (not copied from them):
``snapshot.storage.k8s.io/v1`` VolumeSnapshotClass and VolumeSnapshot (kubernetes-csi
external-snapshotter v8) and ``monitoring.coreos.com/v1`` ServiceMonitor (prometheus-operator).
They cover the fields those APIs define at the levels strata's manifests use and refuse
unknown fields there, so a typo in a template or an example fails.
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_METADATA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "namespace": _NAME,
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
}


def _object(api_version: str, kind: str, body: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", *required],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": _METADATA, **body},
    }


VOLUME_SNAPSHOT_CLASS = _object("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass", {
    "driver": {"type": "string", "minLength": 1},
    "deletionPolicy": {"enum": ["Delete", "Retain"]},
    "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
}, ["driver", "deletionPolicy"])

VOLUME_SNAPSHOT = _object("snapshot.storage.k8s.io/v1", "VolumeSnapshot", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "volumeSnapshotClassName": {"type": "string", "minLength": 1},
            "source": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"persistentVolumeClaimName": {"type": "string"},
                               "volumeSnapshotContentName": {"type": "string"}},
                "oneOf": [{"required": ["persistentVolumeClaimName"]},
                          {"required": ["volumeSnapshotContentName"]}],
            },
        },
    },
}, ["spec"])

_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"},
                   "scheme": {"enum": ["http", "https"]}, "interval": {"type": "string"},
                   "scrapeTimeout": {"type": "string"}, "honorLabels": {"type": "boolean"}},
}
SERVICE_MONITOR = _object("monitoring.coreos.com/v1", "ServiceMonitor", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": {"type": "object", "properties": {
                "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                "matchExpressions": {"type": "array"}}, "additionalProperties": False},
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            "jobLabel": {"type": "string"},
        },
    },
}, ["spec"])

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): VOLUME_SNAPSHOT_CLASS,
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): VOLUME_SNAPSHOT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
