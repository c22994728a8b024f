"""Controller calls across nodes: ``strata controller`` and what a node serves for it.

external-resizer has no node-deployment mode: one resizer per cluster calls
``ControllerExpandVolume`` and ``ControllerModifyVolume`` on one CSI endpoint, yet a strata
volume lives on one node. So ``strata controller`` routes each call to the node that owns
the volume, over the node-to-node channel::

    external-resizer --unix--> strata controller --TLS + ServiceAccount token--> node plugin (owner)
                               (ForwardingController, a PeerDialer)             (its one peer listener)

* ``strata controller --endpoint unix:///csi/csi.sock --tls-ca CA.pem --token-file TOKEN
  [--peer-port 9839] [--peer-server-name NAME] [--node-address NODE=HOST:PORT ...]``
  serves CSI Identity (CONTROLLER_SERVICE + online expansion) and Controller with only
  ``ControllerGetCapabilities`` (EXPAND_VOLUME, MODIFY_VOLUME), ``ControllerExpandVolume``
  and ``ControllerModifyVolume``; every other Controller call is UNIMPLEMENTED. The owner
  node is the part of the volume ID after ``@`` (:func:`csi.services.volume_ids.owner_node`);
  the :class:`~csi.peers.kubedial.KubernetesDialer` finds it at its Node's InternalIP and
  ``--peer-port`` (or :class:`~csi.peers.dial.StaticDialer` with ``--node-address``, where
  there is no API server: tests, static set-ups), trusts the CA bundle ``--tls-ca`` (the
  mounted Secret), checks ``--peer-server-name`` in the node's certificate, and sends the
  projected ServiceAccount token in ``--token-file`` (re-read per call) on every call.
* The node plugin serves the two calls on its one TCP listener
  (:func:`csi.services.export.start_tcp_export`, ``strata serve --peer-listen``) through
  :func:`forwarded_controller`: its own controller, which refuses volumes another node owns
  (NOT_FOUND). The listener checks the token with a TokenReview and admits only strata's own
  ServiceAccounts (``--peer-account``, ``--controller-account``) to these methods.

Errors: every handler answers through the one error seam (:mod:`csi.services.status`): a
malformed volume ID is NOT_FOUND; an owner node that cannot be found or reached is
UNAVAILABLE naming it (external-resizer retries) — after one retry with its address looked
up again (:func:`csi.peers.dial.call_node`); any status the node answers is relayed as it is
(:class:`csi.errors.Relayed`), naming the node.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from csi import __version__
from csi.errors import InvalidArgument
from csi.peers.dial import CachingDialer, PeerDialer, StaticDialer, call_node
from csi.peers.kubedial import KubernetesDialer
from csi.peers.tls import token_from_file
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.services.snapshot_metadata import RelayingSnapshotMetadata
from csi.services.listen import (node_addresses, DEFAULT_DRIVER_NAME, Running, add_common_flags, configure_logging, listen_unix,
                                 new_server, run_until_signalled, socket_path)
from csi.services.volume_ids import owner_node

log = logging.getLogger("strata.forwarder")

CONTROLLER_SERVICE = "csi.v1.Controller"
FORWARDED_METHODS = (f"/{CONTROLLER_SERVICE}/ControllerExpandVolume", f"/{CONTROLLER_SERVICE}/ControllerModifyVolume")
DEFAULT_PEER_PORT = 9839
CONTROLLER_GRACE_SECONDS = 10.0


# --------------------------------------------------------------------------- node side


class _Forwarded(csi_pb2_grpc.ControllerServicer):
    """A Controller service offering only the calls other strata processes make on this node,
    handed to ``target``: expansion and modification forwarded by ``strata controller``, and
    the snapshot a node cloning one of this node's volumes takes first (and removes after)."""

    def __init__(self, target: csi_pb2_grpc.ControllerServicer) -> None:
        self._target = target

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,  # noqa: N802
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        return self._target.ControllerExpandVolume(request, context)

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,  # noqa: N802
                               context: grpc.ServicerContext) -> csi_pb2.ControllerModifyVolumeResponse:
        return self._target.ControllerModifyVolume(request, context)

    # a node cloning a volume of this node asks for a snapshot of it first, then removes it
    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> csi_pb2.CreateSnapshotResponse:
        return self._target.CreateSnapshot(request, context)

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,  # noqa: N802
                       context: grpc.ServicerContext) -> csi_pb2.DeleteSnapshotResponse:
        return self._target.DeleteSnapshot(request, context)


def forwarded_controller(controller: csi_pb2_grpc.ControllerServicer) -> tuple[str, Callable[[grpc.Server], None]]:
    """``(method prefix, add(server))`` for :func:`csi.services.export.start_tcp_export`: the
    forwarded Controller calls of ``controller`` (every other Controller method UNIMPLEMENTED)."""

    def add(server: grpc.Server) -> None:
        csi_pb2_grpc.add_ControllerServicer_to_server(_Forwarded(controller), server)

    return f"/{CONTROLLER_SERVICE}/", add


# --------------------------------------------------------------------------- controller side


class ForwardingController(csi_pb2_grpc.ControllerServicer):
    """Controller service of ``strata controller``: expansion and modification, forwarded."""

    def __init__(self, dialer: PeerDialer, timeout: float = 60.0) -> None:
        self._dialer = dialer
        self._timeout = timeout

    def close(self) -> None:
        close = getattr(self._dialer, "close", None)
        if close is not None:
            close()

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,  # noqa: N802
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerGetCapabilitiesResponse:
        rpc = csi_pb2.ControllerServiceCapability.RPC
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc={"type": t}) for t in (rpc.EXPAND_VOLUME, rpc.MODIFY_VOLUME)])

    def _forward(self, method: str, request: Any) -> Any:
        node = owner_node(request.volume_id)  # NotFound when the ID is not strata's
        return call_node(self._dialer, node, lambda channel: getattr(csi_pb2_grpc.ControllerStub(channel), method)(
            request, timeout=self._timeout))

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,  # noqa: N802
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        response: csi_pb2.ControllerExpandVolumeResponse = self._forward("ControllerExpandVolume", request)
        log.info("expand %s on %s: %d bytes", request.volume_id, owner_node(request.volume_id),
                 response.capacity_bytes)
        return response

    def ControllerModifyVolume(self, request: csi_pb2.ControllerModifyVolumeRequest,  # noqa: N802
                               context: grpc.ServicerContext) -> csi_pb2.ControllerModifyVolumeResponse:
        response: csi_pb2.ControllerModifyVolumeResponse = self._forward("ControllerModifyVolume", request)
        log.info("modify %s on %s: %s", request.volume_id, owner_node(request.volume_id),
                 ",".join(sorted(request.mutable_parameters)))
        return response


class ForwardingIdentity(csi_pb2_grpc.IdentityServicer):
    """Identity of ``strata controller``: a controller that can expand volumes online."""

    def __init__(self, driver_name: str) -> None:
        self._driver_name = driver_name

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=__version__,
                                             manifest={"role": "controller-forwarder"})

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,  # noqa: N802
                              context: grpc.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        service = csi_pb2.PluginCapability.Service
        expansion = csi_pb2.PluginCapability.VolumeExpansion
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=service(type=service.CONTROLLER_SERVICE)),
            csi_pb2.PluginCapability(service=service(type=service.SNAPSHOT_METADATA_SERVICE)),  # relayed to the owner
            csi_pb2.PluginCapability(volume_expansion=expansion(type=expansion.ONLINE)),
        ])

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:  # noqa: N802
        return csi_pb2.ProbeResponse(ready={"value": True})


@dataclass(frozen=True)
class ControllerConfig:
    endpoint: str
    tls_ca: Path  # CA bundle the nodes' certificates are signed by (the mounted Secret's ca.crt)
    token_file: Path  # this pod's projected ServiceAccount token (audience: the nodes' --peer-audience)
    driver_name: str = DEFAULT_DRIVER_NAME
    peer_port: int = DEFAULT_PEER_PORT
    server_name: str = ""  # name checked in the nodes' certificate ("" = the address)
    node_addresses: tuple[tuple[str, str], ...] = ()
    timeout: float = 60.0
    stream_timeout: float = 600.0  # a whole SnapshotMetadata stream (the sidecar's default limit is 10 min)

    def dialer(self) -> CachingDialer:
        """A dialer for these settings; the CA and the token file must be readable now."""
        token = token_from_file(self.token_file)
        try:
            if not token():
                raise InvalidArgument(f"token file {self.token_file} is empty")
        except OSError as exc:
            raise InvalidArgument(f"cannot read token file {self.token_file}: {exc.strerror}") from exc
        try:
            ca = Path(self.tls_ca).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read CA bundle {self.tls_ca}: {exc.strerror}") from exc
        if b"-----BEGIN CERTIFICATE" not in ca:
            raise InvalidArgument(f"CA bundle {self.tls_ca} holds no PEM certificate")
        if self.node_addresses:
            return StaticDialer(dict(self.node_addresses), ca, token, self.server_name)
        return KubernetesDialer(self.peer_port, ca, token, self.server_name)


def start_controller(config: ControllerConfig) -> tuple[grpc.Server, ForwardingController]:
    """Serve Identity + the forwarding Controller on ``config.endpoint`` (owner-only socket)."""
    path = socket_path(config.endpoint)
    dialer = config.dialer()
    controller = ForwardingController(dialer, config.timeout)
    server = new_server(8, "controller")
    csi_pb2_grpc.add_IdentityServicer_to_server(ForwardingIdentity(config.driver_name), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(controller, server)
    csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(
        RelayingSnapshotMetadata(dialer, timeout=config.stream_timeout), server)
    listen_unix(server, path)
    server.start()
    return server, controller


def parse_args(argv: list[str]) -> tuple[ControllerConfig, str]:
    parser = argparse.ArgumentParser(
        prog="strata controller",
        description="Serve ControllerExpandVolume and ControllerModifyVolume for external-resizer and forward "
                    "them to the owner node over the node-to-node channel.")
    parser.add_argument("--endpoint", required=True, help="unix:///PATH/csi.sock to serve")
    parser.add_argument("--tls-ca", required=True, help="CA bundle (PEM) the nodes' peer certificates are signed by")
    parser.add_argument("--token-file", required=True,
                        help="this pod's projected ServiceAccount token, sent on every call (re-read per call)")
    parser.add_argument("--peer-port", type=int, default=DEFAULT_PEER_PORT,
                        help="port of the node plugins' peer listener (with the Node's InternalIP)")
    parser.add_argument("--peer-server-name", default="",
                        help="name checked in the nodes' certificate (default: the address dialed)")
    parser.add_argument("--node-address", action="append", default=[], metavar="NODE=HOST:PORT",
                        help="a node's listener address, instead of the Kubernetes API (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    table = node_addresses(parser, args.node_address)
    if not 0 < args.peer_port < 65536:
        parser.error("--peer-port must be 1-65535")
    config = ControllerConfig(endpoint=args.endpoint, tls_ca=Path(args.tls_ca), token_file=Path(args.token_file),
                              driver_name=args.driver_name, peer_port=args.peer_port,
                              server_name=args.peer_server_name, node_addresses=tuple(table), timeout=args.timeout)
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
