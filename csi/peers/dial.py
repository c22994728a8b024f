"""Reaching another strata node: the :class:`PeerDialer` interface, and a static one.

A dialer turns a node ID (the ``@node`` part of a volume or snapshot ID) into a gRPC channel
to that node's TCP listener (TLS, this process's ServiceAccount token on every call, see
:func:`csi.peers.tls.client_channel`). Channels are cached per node; ``forget(node)`` drops
the cached address and channel after a call failed, so the next ``dial`` looks it up again.

* :class:`CachingDialer` — the shared machinery: a ``resolve(node) -> HOST:PORT`` function,
  an address and a channel cached per node, both dropped by ``forget``; ``connect(node,
  port)`` opens a TLS socket to another port of the node's address (the bulk lane,
  :mod:`csi.peers.bulk`), trusting the same CA and checking the same name.
* :class:`StaticDialer` — addresses given up front (tests, a cluster without the API).
* :class:`csi.peers.kubedial.KubernetesDialer` — the Node's InternalIP from the API.
* :func:`call_node` — one unary call to a node through a dialer: a channel failure
  (UNAVAILABLE) forgets the node and retries once with a fresh lookup; what the node
  answers is relayed (:class:`csi.errors.Relayed`) naming the node; a node that still cannot
  be reached is :class:`csi.errors.Unavailable` naming it.

Callers raise :class:`csi.errors.Unavailable` naming the node when it cannot be reached.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from csi.errors import Relayed, Unavailable
from csi.peers.tls import client_channel, client_context

TokenSource = Callable[[], str]
T = TypeVar("T")
log = logging.getLogger("strata.peers.dial")


class PeerDialer(Protocol):
    def dial(self, node_id: str) -> grpc.Channel:
        """A channel to ``node_id``'s listener (cached); Unavailable when its address is unknown."""

    def forget(self, node_id: str) -> None:
        """A call to ``node_id`` failed: drop its cached channel and address."""

    def connect(self, node_id: str, port: int, timeout: float = 10.0) -> ssl.SSLSocket:
        """A TLS socket to ``port`` at ``node_id``'s address; Unavailable naming the node."""


class CachingDialer:
    """Node ID -> ``resolve(node)`` (``HOST:PORT``, cached); TLS trusting ``ca`` (checking
    ``server_name`` in the node's certificate when given, else the address); ``token`` on
    every call. ``resolve`` raises :class:`~csi.errors.Unavailable` naming the node."""

    def __init__(self, resolve: Callable[[str], str], ca: Path | bytes, token: TokenSource | None,
                 server_name: str | None = None) -> None:
        self._resolve = resolve
        self._ca, self._token, self._server_name = ca, token, server_name or None
        self._addresses: dict[str, str] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    def address(self, node_id: str) -> str:
        with self._lock:
            known = self._addresses.get(node_id)
        if known is not None:
            return known
        address = self._resolve(node_id)  # outside the lock: may ask the API server
        with self._lock:
            return self._addresses.setdefault(node_id, address)

    def dial(self, node_id: str) -> grpc.Channel:
        address = self.address(node_id)
        with self._lock:
            channel = self._channels.get(node_id)
            if channel is None:
                channel = self._channels[node_id] = client_channel(address, self._ca, self._token,
                                                                   server_name=self._server_name)
            return channel

    def connect(self, node_id: str, port: int, timeout: float = 10.0) -> ssl.SSLSocket:
        host = self.address(node_id).rpartition(":")[0].strip("[]")
        if self._context is None:
            self._context = client_context(self._ca)
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise Unavailable(f"node {node_id} cannot be reached at {host} port {port}: {exc.strerror or exc}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return self._context.wrap_socket(raw, server_hostname=self._server_name or host)
        except OSError as exc:  # ssl.SSLError included
            raw.close()
            raise Unavailable(f"node {node_id} at {host} port {port}: TLS failed: {exc}") from exc

    def forget(self, node_id: str) -> None:
        with self._lock:
            self._addresses.pop(node_id, None)
            channel = self._channels.pop(node_id, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            self._addresses.clear()
        for channel in channels:
            channel.close()


class StaticDialer(CachingDialer):
    """Node ID -> ``HOST:PORT`` given up front; TLS trusting ``ca``; ``token`` on every call."""

    def __init__(self, addresses: Mapping[str, str], ca: Path | bytes, token: TokenSource | None,
                 server_name: str | None = None) -> None:
        table = dict(addresses)

        def resolve(node_id: str) -> str:
            try:
                return table[node_id]
            except KeyError:
                raise Unavailable(f"node {node_id} has no known address") from None

        super().__init__(resolve, ca, token, server_name)


def call_node(dialer: PeerDialer, node_id: str, call: Callable[[grpc.Channel], T], *, retries: int = 1) -> T:
    """``call(channel)`` on ``node_id`` (see the module docstring). For unary calls; a streaming
    call's errors arrive while iterating, where the caller handles them the same way."""
    attempt = 0
    while True:
        channel = dialer.dial(node_id)  # Unavailable naming the node when it has no address
        try:
            return call(channel)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = (exc.details() if hasattr(exc, "details") else "") or ""
            if code != grpc.StatusCode.UNAVAILABLE:
                raise Relayed(code.name, f"node {node_id}: {details}") from exc
            dialer.forget(node_id)  # the address may have changed: look it up again
            if attempt >= retries:
                raise Unavailable(f"node {node_id} cannot be reached: {details}") from exc
            attempt += 1
            log.info("node %s unreachable (%s); looking its address up again", node_id, details)
