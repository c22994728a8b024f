"""Reaching another strata node: the :class:`PeerDialer` interface, and a static one.

A dialer turns a node ID (the ``@node`` part of a volume or snapshot ID) into a gRPC channel
to that node's TCP listener (TLS, this process's ServiceAccount token on every call, see
:func:`csi.peers.tls.client_channel`). Channels are cached per node; ``forget(node)`` drops
the cached address and channel after a call failed, so the next ``dial`` looks it up again.

* :class:`StaticDialer` — addresses given up front (tests, a cluster without the API).
* The Kubernetes-backed dialer (node addresses from the API) lives beside it.

Callers raise :class:`csi.errors.Unavailable` naming the node when it cannot be reached.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import grpc

from csi.errors import Unavailable
from csi.peers.tls import client_channel

TokenSource = Callable[[], str]


class PeerDialer(Protocol):
    def dial(self, node_id: str) -> grpc.Channel:
        """A channel to ``node_id``'s listener (cached); Unavailable when its address is unknown."""

    def forget(self, node_id: str) -> None:
        """A call to ``node_id`` failed: drop its cached channel and address."""


class StaticDialer:
    """Node ID -> ``HOST:PORT`` given up front; TLS trusting ``ca``; ``token`` on every call."""

    def __init__(self, addresses: Mapping[str, str], ca: Path | bytes, token: TokenSource | None,
                 server_name: str | None = None) -> None:
        self._addresses = dict(addresses)
        self._ca, self._token, self._server_name = ca, token, server_name
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def address(self, node_id: str) -> str:
        try:
            return self._addresses[node_id]
        except KeyError:
            raise Unavailable(f"node {node_id} has no known address") from None

    def dial(self, node_id: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(node_id)
            if channel is None:
                channel = self._channels[node_id] = client_channel(self.address(node_id), self._ca, self._token,
                                                                   server_name=self._server_name)
            return channel

    def forget(self, node_id: str) -> None:
        with self._lock:
            channel = self._channels.pop(node_id, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
