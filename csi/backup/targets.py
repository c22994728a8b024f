"""Opening a backup target for a parsed reference: a registry repository (``oci://``) or an
OCI image layout directory (``oci-layout:``). The interface they share is :mod:`csi.backup.target`."""

from __future__ import annotations

from csi.backup.auth import DockerConfig
from csi.backup.layout import LayoutTarget
from csi.backup.reference import Reference
from csi.backup.registry import RegistryTarget
from csi.backup.target import Target


def open_target(ref: Reference, *, credentials: DockerConfig | None = None,
                scheme: str | None = None, create: bool = False) -> Target:
    """A target for ``ref``: a :class:`~csi.backup.registry.RegistryTarget` for ``oci://``
    references (credentials looked up by host in ``credentials``; ``scheme`` overrides
    http/https), an :class:`~csi.backup.layout.LayoutTarget` for ``oci-layout:`` (``create``
    makes the directory when it does not exist: backups do, restores do not)."""
    if ref.kind == "layout":
        return LayoutTarget(ref.repository, create=create)
    config = credentials or DockerConfig()
    return RegistryTarget(ref.host, ref.repository, credentials=config.for_host(ref.host),
                          scheme=scheme or ref.scheme)
