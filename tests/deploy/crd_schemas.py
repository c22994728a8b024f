"""JSON schemas for the custom-resource kinds strata ships, which kubernetes-validate lacks.

Written for these tests from the CRDs' published APIs (not copied from them):
``snapshot.storage.k8s.io/v1`` VolumeSnapshotClass and VolumeSnapshot and
``groupsnapshot.storage.k8s.io/v1beta1`` VolumeGroupSnapshotClass and VolumeGroupSnapshot
(kubernetes-csi external-snapshotter v8), ``monitoring.coreos.com/v1`` ServiceMonitor
(prometheus-operator), and ``cert-manager.io/v1`` Certificate and Issuer (cert-manager v1.x:
the fields of CertificateSpec and IssuerSpec strata's templates can use).
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

VOLUME_GROUP_SNAPSHOT_CLASS = _object("groupsnapshot.storage.k8s.io/v1beta1", "VolumeGroupSnapshotClass", {
    "driver": {"type": "string", "minLength": 1},
    "deletionPolicy": {"enum": ["Delete", "Retain"]},
    "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
}, ["driver", "deletionPolicy"])

VOLUME_GROUP_SNAPSHOT = _object("groupsnapshot.storage.k8s.io/v1beta1", "VolumeGroupSnapshot", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["source"],
        "properties": {
            "volumeGroupSnapshotClassName": {"type": "string", "minLength": 1},
            "source": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "additionalProperties": False, "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"}}},
                    "volumeGroupSnapshotContentName": {"type": "string"}},
                "oneOf": [{"required": ["selector"]}, {"required": ["volumeGroupSnapshotContentName"]}],
            },
        },
    },
}, ["spec"])

_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
_ISSUER_REF = {"type": "object", "additionalProperties": False, "required": ["name"],
               "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                              "group": {"type": "string"}}}
_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
           "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
           "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
           "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
CERTIFICATE = _object("cert-manager.io/v1", "Certificate", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": _NAME,
            "issuerRef": _ISSUER_REF,
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": {"type": "array", "items": {"type": "string"}},
            "ipAddresses": {"type": "array", "items": {"type": "string"}},
            "duration": _DURATION,
            "renewBefore": _DURATION,
            "isCA": {"type": "boolean"},
            "usages": {"type": "array", "items": {"enum": _USAGES}},
            "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"},
                "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "rotationPolicy": {"enum": ["Never", "Always"]}}},
            "secretTemplate": {"type": "object", "additionalProperties": False, "properties": {
                "labels": {"type": "object"}, "annotations": {"type": "object"}}},
        },
        "anyOf": [{"required": ["commonName"]}, {"required": ["dnsNames"]}, {"required": ["ipAddresses"]}],
    },
}, ["spec"])

ISSUER = _object("cert-manager.io/v1", "Issuer", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "selfSigned": {"type": "object", "additionalProperties": False,
                           "properties": {"crlDistributionPoints": {"type": "array"}}},
            "ca": {"type": "object", "additionalProperties": False, "required": ["secretName"],
                   "properties": {"secretName": _NAME, "crlDistributionPoints": {"type": "array"},
                                  "ocspServers": {"type": "array"}}},
        },
        "oneOf": [{"required": ["selfSigned"]}, {"required": ["ca"]}],
    },
}, ["spec"])

VOLUME_SNAPSHOT_CONTENT = _object("snapshot.storage.k8s.io/v1", "VolumeSnapshotContent", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["driver", "deletionPolicy", "source", "volumeSnapshotRef"],
        "properties": {
            "driver": {"type": "string", "minLength": 1},
            "deletionPolicy": {"enum": ["Delete", "Retain"]},
            "volumeSnapshotClassName": {"type": "string", "minLength": 1},
            "sourceVolumeMode": {"enum": ["Filesystem", "Block"]},
            "source": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"snapshotHandle": {"type": "string", "minLength": 1},
                               "volumeHandle": {"type": "string", "minLength": 1}},
                "oneOf": [{"required": ["snapshotHandle"]}, {"required": ["volumeHandle"]}],
            },
            "volumeSnapshotRef": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "namespace"],
                "properties": {"apiVersion": {"type": "string"}, "kind": {"const": "VolumeSnapshot"},
                               "name": _NAME, "namespace": _NAME, "uid": {"type": "string"},
                               "resourceVersion": {"type": "string"}, "fieldPath": {"type": "string"}},
            },
        },
    },
}, ["spec"])

SNAPSHOT_METADATA_SERVICE = _object("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService", {
    "spec": {
        "type": "object",
        "additionalProperties": False,
        "required": ["address", "audience", "caCert"],
        "properties": {
            "address": {"type": "string", "minLength": 1},
            "audience": {"type": "string", "minLength": 1},
            "caCert": {"type": "string", "minLength": 1, "contentEncoding": "base64"},
        },
    },
}, ["spec"])

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService"): SNAPSHOT_METADATA_SERVICE,
    ("groupsnapshot.storage.k8s.io/v1beta1", "VolumeGroupSnapshotClass"): VOLUME_GROUP_SNAPSHOT_CLASS,
    ("groupsnapshot.storage.k8s.io/v1beta1", "VolumeGroupSnapshot"): VOLUME_GROUP_SNAPSHOT,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): VOLUME_SNAPSHOT_CLASS,
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): VOLUME_SNAPSHOT,
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotContent"): VOLUME_SNAPSHOT_CONTENT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
