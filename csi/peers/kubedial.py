"""The Kubernetes-backed :class:`~csi.peers.dial.PeerDialer`: a node's address from its Node.

A node ID is the Kubernetes node name (the chart passes ``--node-id=$(NODE_NAME)``), and the
node plugin pods run with ``hostNetwork: true``, so the plugin listening on the node's
InternalIP is reached at ``<InternalIP>:<peer port>`` (:func:`csi.kube.node_internal_ip`; IPv6
bracketed). Why the Node and not a pod IP behind a headless Service: with host networking the
pod IP *is* the node's address, one ``get`` on ``nodes/<name>`` answers it (the owner's name is
already in every volume and snapshot ID, so no EndpointSlice list/watch and no pod -> node
mapping is needed), it needs only ``nodes get`` in RBAC, and it stays right while the pod is
replaced. The address is cached per node; a failed call makes the caller ``forget`` it
(:func:`csi.peers.dial.call_node` does), and the next ``dial`` reads the Node again.

TLS: the CA bundle from the mounted Secret, the certificate's name checked as
``server_name`` (every node presents the chart's one peer certificate, whose name is not an
address), and this process's projected ServiceAccount token (re-read from its file per call:
kubelet rotates it) as the bearer token.

Errors: a Node that does not exist, has no InternalIP, or cannot be read because the API
server is unreachable is :class:`~csi.errors.Unavailable` naming the node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from csi.errors import StrataError, Unavailable
from csi.kube import incluster_api_client, node_internal_ip
from csi.peers.auth import preload_client
from csi.peers.dial import CachingDialer, TokenSource


def host_port(ip: str, port: int) -> str:
    """``HOST:PORT`` with an IPv6 address in brackets."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class KubernetesDialer(CachingDialer):
    """Node name -> ``InternalIP:port`` read through the API (see the module docstring)."""

    def __init__(self, port: int, ca: Path | bytes, token: TokenSource | None, server_name: str | None = None,
                 api_client: Callable[[], Any] | Any | None = None) -> None:
        self.port = port
        self._api = api_client
        self._own_client: Any = None

        def resolve(node_id: str) -> str:
            try:
                client = self._client()
                return host_port(node_internal_ip(node_id, client), self.port)
            except Unavailable:
                raise
            except StrataError as exc:
                raise Unavailable(f"node {node_id} cannot be reached: {exc}") from exc

        super().__init__(resolve, ca, token, server_name)
        preload_client()  # the first dial reads a Node through the client

    def _client(self) -> Any:
        if self._api is not None:
            return self._api() if callable(self._api) else self._api
        if self._own_client is None:  # one in-cluster client, made at the first lookup
            self._own_client = incluster_api_client()
        return self._own_client
