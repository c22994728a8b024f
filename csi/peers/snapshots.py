"""A VolumeSnapshot's CSI handle, read through the Kubernetes API.

As Kubernetes' external-snapshot-metadata sidecar resolves the snapshots a caller names:
``VolumeSnapshot`` ``namespace/name`` (``snapshot.storage.k8s.io/v1``) ->
``status.boundVolumeSnapshotContentName`` -> the cluster-scoped ``VolumeSnapshotContent`` ->
``status.snapshotHandle`` (the ID the CSI driver issued, ``snap-<hex>@<node>`` for strata).

Errors: a VolumeSnapshot or content that does not exist is :class:`~csi.errors.NotFound`; one
not bound yet, or whose content has no handle yet (not ready), or whose content belongs to
another CSI driver, is :class:`~csi.errors.FailedPrecondition`; an API server that cannot be
reached or refuses strata's own request is :class:`~csi.errors.Unavailable`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from csi.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

GROUP = "snapshot.storage.k8s.io"
VERSION = "v1"
SNAPSHOTS = "volumesnapshots"
CONTENTS = "volumesnapshotcontents"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def check_object_name(namespace: str, name: str) -> None:
    if not _DNS_LABEL.fullmatch(namespace or ""):
        raise InvalidArgument(f"namespace {namespace[:80]!r} is not a valid Kubernetes namespace")
    if not _DNS_SUBDOMAIN.fullmatch(name or ""):
        raise InvalidArgument(f"VolumeSnapshot name {name[:80]!r} is not a valid Kubernetes object name")


class SnapshotResolver:
    """VolumeSnapshot namespace/name -> snapshot handle (see the module docstring)."""

    def __init__(self, api_client: Callable[[], Any] | Any, driver_name: str = "") -> None:
        self._api_client = api_client
        self.driver_name = driver_name  # when set, the content must belong to this CSI driver

    def _get(self, what: str, **kw: str) -> dict[str, Any]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        api_client = self._api_client() if callable(self._api_client) else self._api_client
        api = client.CustomObjectsApi(api_client)
        try:
            if "namespace" in kw:
                obj = api.get_namespaced_custom_object(GROUP, VERSION, kw["namespace"], SNAPSHOTS, kw["name"],
                                                       _request_timeout=15)
            else:
                obj = api.get_cluster_custom_object(GROUP, VERSION, CONTENTS, kw["name"], _request_timeout=15)
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(f"{what} does not exist") from exc
            raise Unavailable(f"reading {what}: API server answered {exc.status} {exc.reason}") from exc
        except (HTTPError, OSError) as exc:
            raise Unavailable(f"reading {what}: API server unreachable: {exc}") from exc
        if not isinstance(obj, dict):
            raise Unavailable(f"reading {what}: unexpected answer")
        return obj

    def handle(self, namespace: str, name: str) -> str:
        check_object_name(namespace, name)
        what = f"VolumeSnapshot {namespace}/{name}"
        snap = self._get(what, namespace=namespace, name=name)
        content_name = (snap.get("status") or {}).get("boundVolumeSnapshotContentName") or ""
        if not content_name:
            raise FailedPrecondition(f"{what} is not bound to a VolumeSnapshotContent yet")
        content = self._get(f"VolumeSnapshotContent {content_name}", name=content_name)
        spec = content.get("spec") or {}
        ref = spec.get("volumeSnapshotRef") or {}
        if ref and (ref.get("namespace") != namespace or ref.get("name") != name):
            raise FailedPrecondition(f"VolumeSnapshotContent {content_name} is bound to "
                                     f"{ref.get('namespace')}/{ref.get('name')}, not to {namespace}/{name}")
        if self.driver_name and spec.get("driver") not in (None, self.driver_name):
            raise FailedPrecondition(f"{what} belongs to CSI driver {spec.get('driver')!r}, not {self.driver_name}")
        handle = (content.get("status") or {}).get("snapshotHandle") or ""
        if not handle:
            raise FailedPrecondition(f"{what} is not ready: its content {content_name} has no snapshot handle yet")
        return str(handle)
