"""Volume expansion across nodes: ``strata controller`` and the node's forward listener.

external-resizer has no node-deployment mode: one resizer per cluster calls
``ControllerExpandVolume`` on one CSI endpoint, yet a strata volume lives on one node.
So two small pieces route the call to the node that owns the volume::

    external-resizer --unix--> strata controller --TCP + token--> node plugin (owner)
                               (ForwardingController)            (forward listener)

* ``strata controller --endpoint unix:///csi/csi.sock --driver-name NAME
  --forward-port 9839 --forward-token-file FILE [--node-address NODE=HOST:PORT ...]``
  serves CSI Identity (CONTROLLER_SERVICE + online expansion) and Controller with only
  ``ControllerGetCapabilities`` (EXPAND_VOLUME) and ``ControllerExpandVolume``; every other
  Controller call is UNIMPLEMENTED. The owner node is the part of the volume ID after
  ``@`` (:func:`csi.services.volume_ids.owner_node`); its address is the Node's
  InternalIP read through the Kubernetes API (:func:`csi.kube.node_internal_ip`)
  with ``--forward-port``, or a static table given as ``--node-address NODE=HOST:PORT``
  (repeatable) where there is no API server (tests, static setups).
* The node plugin (``strata serve --forward-listen ADDR --forward-token-file FILE``) runs
  :func:`start_forward_listener`: a separate gRPC server on TCP that offers nothing but
  ``Controller/ControllerExpandVolume`` and hands it to the plugin's own controller,
  which refuses volumes another node owns (NOT_FOUND).

Authentication: both sides read the same shared token (a Kubernetes Secret mounted in both
pods). The controller sends it as ``x-strata-forward-token`` metadata; the listener compares
it in constant time (:func:`hmac.compare_digest`) and answers UNAUTHENTICATED, before
the request reaches the plugin, when it is missing or wrong. The channel itself is plain
TCP on the node network: the token authenticates the caller but is not encrypted, so the
cluster network must be trusted (or restricted with a NetworkPolicy to the controller).

Errors: both servers are built by :func:`csi.services.listen.new_server`, so every
handler — the token check's refusal included — answers through the one error seam
(:mod:`csi.services.status`): a malformed volume ID or an owner node that cannot be
resolved is NOT_FOUND; a node that cannot be reached is UNAVAILABLE (external-resizer
retries); any status the node answers is relayed as it is (:class:`csi.errors.Relayed`).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from csi import __version__
from csi.errors import InvalidArgument, NotFound, Relayed, StrataError, Unauthenticated
from csi.kube import node_internal_ip
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.listen import (DEFAULT_DRIVER_NAME, Running, add_common_flags, configure_logging, listen_unix,
                                 new_server, run_until_signalled, socket_path)
from csi.services.volume_ids import owner_node

log = logging.getLogger("strata.forwarder")

TOKEN_HEADER = "x-strata-forward-token"
EXPAND_METHOD = "/csi.v1.Controller/ControllerExpandVolume"
DEFAULT_FORWARD_PORT = 9839
CONTROLLER_GRACE_SECONDS = 10.0


def read_token(path: Path) -> str:
    """The shared token in ``path`` (surrounding whitespace dropped); refuses an empty one."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read forward token file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise InvalidArgument(f"forward token in {path} is shorter than 16 characters")
    return token


# --------------------------------------------------------------------------- node side


class _TokenCheck(grpc.ServerInterceptor):
    """Lets a call through only with the right token; answers UNAUTHENTICATED otherwise
    (through the error seam, which runs around this interceptor)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            raise Unauthenticated("missing or wrong forward token")

        self._refusal = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        presented = b""
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_HEADER:
                presented = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if not hmac.compare_digest(presented, self._token):
            log.warning("refused %s: missing or wrong forward token", details.method)
            return self._refusal
        return continuation(details)


class _ExpandOnly(csi_pb2_grpc.ControllerServicer):
    """A Controller service offering only ControllerExpandVolume, handed to ``target``."""

    def __init__(self, target: csi_pb2_grpc.ControllerServicer) -> None:
        self._target = target

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        return self._target.ControllerExpandVolume(request, context)


def start_forward_listener(address: str, token_file: Path,
                           controller: csi_pb2_grpc.ControllerServicer) -> grpc.Server:
    """Serve ``controller``'s ControllerExpandVolume (only) on TCP ``address``, token-checked.

    ``address`` is ``HOST:PORT``. The returned server is started; stop it with
    ``server.stop(grace)``. A missing or short token, or an address that cannot be bound,
    raises before anything listens.
    """
    token = read_token(token_file)
    if "://" in address or ":" not in address:
        raise InvalidArgument(f"forward listen address {address!r} must be HOST:PORT")
    server = new_server(4, "forward", [_TokenCheck(token)])
    csi_pb2_grpc.add_ControllerServicer_to_server(_ExpandOnly(controller), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise StrataError(f"cannot listen on {address} for forwarded expansions")
    server.start()
    log.info("forwarded expansions accepted on %s", address.rsplit(":", 1)[0] + f":{port}")
    return server


# --------------------------------------------------------------------------- controller side


class NodeAddresses(Protocol):
    """Where the forward listener of a node is: ``node name -> HOST:PORT`` (NotFound if none)."""

    def __call__(self, node: str) -> str: ...


@dataclass(frozen=True)
class StaticAddresses:
    """A fixed table ``((node, HOST:PORT), ...)``; a node not in it is NotFound."""

    table: tuple[tuple[str, str], ...]

    def __call__(self, node: str) -> str:
        for name, address in self.table:
            if name == node:
                return address
        raise NotFound(f"node {node!r} is not in the forwarder's address table")


@dataclass(frozen=True)
class KubernetesAddresses:
    """The Node's InternalIP (in-cluster Kubernetes API) and the forward port."""

    port: int

    def __call__(self, node: str) -> str:
        ip = node_internal_ip(node)
        return f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}"


class ForwardingController(csi_pb2_grpc.ControllerServicer):
    """Controller service of ``strata controller``: expansion, forwarded to the owner."""

    def __init__(self, addresses: NodeAddresses, token: str, timeout: float = 60.0) -> None:
        self._addresses = addresses
        self._token = token
        self._timeout = timeout
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str) -> csi_pb2_grpc.ControllerStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.insecure_channel(address)
        return csi_pb2_grpc.ControllerStub(channel)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerGetCapabilitiesResponse:
        expand = csi_pb2.ControllerServiceCapability.RPC.EXPAND_VOLUME
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc={"type": expand})])

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        node = owner_node(request.volume_id)
        address = self._addresses(node)
        try:
            response: csi_pb2.ControllerExpandVolumeResponse = self._stub(address).ControllerExpandVolume(
                request, timeout=self._timeout, metadata=((TOKEN_HEADER, self._token),))
        except grpc.RpcError as exc:
            # Relay the owner's answer (or UNAVAILABLE / DEADLINE_EXCEEDED from the channel).
            raise Relayed(exc.code().name, f"node {node} ({address}): {exc.details()}") from exc
        log.info("expand %s on %s (%s): %d bytes", request.volume_id, node, address, response.capacity_bytes)
        return response


class ForwardingIdentity(csi_pb2_grpc.IdentityServicer):
    """Identity of ``strata controller``: a controller that can expand volumes online."""

    def __init__(self, driver_name: str) -> None:
        self._driver_name = driver_name

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=__version__,
                                             manifest={"role": "expansion-forwarder"})

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        service = csi_pb2.PluginCapability.Service
        expansion = csi_pb2.PluginCapability.VolumeExpansion
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=service(type=service.CONTROLLER_SERVICE)),
            csi_pb2.PluginCapability(volume_expansion=expansion(type=expansion.ONLINE)),
        ])

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready={"value": True})


@dataclass(frozen=True)
class ControllerConfig:
    endpoint: str
    token_file: Path
    driver_name: str = DEFAULT_DRIVER_NAME
    forward_port: int = DEFAULT_FORWARD_PORT
    node_addresses: tuple[tuple[str, str], ...] = ()
    timeout: float = 60.0

    def addresses(self) -> NodeAddresses:
        if self.node_addresses:
            return StaticAddresses(self.node_addresses)
        return KubernetesAddresses(self.forward_port)


def start_controller(config: ControllerConfig) -> tuple[grpc.Server, ForwardingController]:
    """Serve Identity + the forwarding Controller on ``config.endpoint`` (owner-only socket)."""
    path = socket_path(config.endpoint)
    controller = ForwardingController(config.addresses(), read_token(config.token_file), config.timeout)
    server = new_server(8, "controller")
    csi_pb2_grpc.add_IdentityServicer_to_server(ForwardingIdentity(config.driver_name), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(controller, server)
    listen_unix(server, path)
    server.start()
    return server, controller


def parse_args(argv: list[str]) -> tuple[ControllerConfig, str]:
    parser = argparse.ArgumentParser(
        prog="strata controller",
        description="Serve ControllerExpandVolume for external-resizer and forward it to the owner node.")
    parser.add_argument("--endpoint", required=True, help="unix:///PATH/csi.sock to serve")
    parser.add_argument("--forward-token-file", required=True, help="file holding the shared token")
    parser.add_argument("--forward-port", type=int, default=DEFAULT_FORWARD_PORT,
                        help="port of the node plugins' forward listener (with the Node's InternalIP)")
    parser.add_argument("--node-address", action="append", default=[], metavar="NODE=HOST:PORT",
                        help="a node's listener address, instead of the Kubernetes API (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    table = []
    for entry in args.node_address:
        node, sep, address = entry.partition("=")
        if not sep or not node or ":" not in address:
            parser.error(f"--node-address {entry!r} must be NODE=HOST:PORT")
        table.append((node, address))
    if not 0 < args.forward_port < 65536:
        parser.error("--forward-port must be 1-65535")
    config = ControllerConfig(endpoint=args.endpoint, token_file=Path(args.forward_token_file),
                              driver_name=args.driver_name, forward_port=args.forward_port,
                              node_addresses=tuple(table), timeout=args.timeout)
    return config, args.log_level


def main(argv: list[str]) -> int:
    config, level = parse_args(argv)
    configure_logging(level)

    def start() -> Running:
        server, controller = start_controller(config)

        def stop() -> None:
            server.stop(CONTROLLER_GRACE_SECONDS).wait()
            controller.close()

        return Running(f"strata {__version__} controller serving {config.endpoint}", stop, CONTROLLER_GRACE_SECONDS)

    return run_until_signalled(start, log)
