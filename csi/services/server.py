"""``strata serve``: the CSI plugin on a unix socket.

Usage::

    strata serve [--endpoint unix:///PATH/csi.sock] [--node-id NAME] [--root DIR]
                 [--driver auto|vfs|overlay|aufs|btrfs|devicemapper] [--driver-name strata.csi.dev]
                 [--max-volumes N] [--storage-opt KEY=VALUE ...] [--metrics-address :9840]
                 [--peer-listen HOST:PORT --tls-cert F --tls-key F [--peer-audience A ...]
                  [--peer-account NS/NAME ...] [--controller-account NS/NAME ...] [--export-importer NS/NAME ...]]
                 [--tls-ca F --token-file F [--peer-server-name NAME] [--peer-port N]
                  [--node-address NODE=HOST:PORT ...]]
                 [--log-level info] [--version]

Defaults work on a laptop: root ``./strata-data``, the socket inside it, node ID the
host name, driver chosen by the registry (vfs when nothing better fits). With ``--driver
auto`` and ``STRATA_NODE_DRIVER_LABEL`` set (the Helm chart sets it), the Node label of
that name picks the driver (:func:`csi.kube.resolve_driver`), read once at start-up.
``--storage-opt`` (repeatable, as Docker's) passes options to the layered driver, e.g.
``dm.thinpooldev=/dev/mapper/POOL`` for devicemapper.
The socket is created owner-only (0600). SIGTERM or SIGINT stop accepting calls, let
in-flight calls finish (up to ``--grace`` seconds) and exit 0.

The node-to-node channel, one TCP listener for everything that crosses the network
(:func:`csi.services.export.start_tcp_export`):

* ``--peer-listen HOST:PORT`` with ``--tls-cert``/``--tls-key`` (PEM, reloaded when the
  Secret rotates them): TLS, and every call's ServiceAccount token checked with a
  TokenReview for the ``--peer-audience`` audiences (repeatable; default ``strata-peer`` and
  ``strata-export``). On it: the Diff export service — backup agents authorized per
  VolumeSnapshot (SubjectAccessReview), strata's node ServiceAccounts (``--peer-account``)
  as trusted peers (any snapshot of this node, and ImportDiff), ``--export-importer``
  accounts may ImportDiff — and the forwarded ``ControllerExpandVolume`` /
  ``ControllerModifyVolume`` (:mod:`csi.services.forwarder`) for ``--peer-account`` and
  ``--controller-account`` only. The former ``--export-listen``, ``--export-tls-cert``,
  ``--export-tls-key`` and ``--export-audience`` are accepted as aliases.
* Beside it, the bulk lane (``--bulk-port``, default any free port, ``-1`` none;
  :mod:`csi.peers.bulk`): the same certificate, no tokens of its own — a node that the
  channel authorized for an ExportDiff gets a one-time ticket (OpenExport) and fetches the
  bytes there. ``--digest-snapshots`` (default: with ``--peer-listen``) hashes each new
  snapshot's layers in the background (:mod:`csi.backup.digests`).
* Dialing other nodes (the plugin's :class:`~csi.peers.dial.PeerDialer`, used to restore
  another node's snapshot): ``--tls-ca`` (the CA bundle of the peers' certificates) and
  ``--token-file`` (this pod's projected ServiceAccount token) enable it; addresses from
  the Node's InternalIP (:class:`~csi.peers.kubedial.KubernetesDialer`) with ``--peer-port``
  (default: the port of ``--peer-listen``), or ``--node-address NODE=HOST:PORT``
  (repeatable) without an API server; ``--peer-server-name`` is the name checked in the
  peers' certificate (the chart's shared peer certificate).

For programs (tests, benchmarks, the demo)::

    handle = start_server(ServeConfig(root=..., endpoint="unix:///tmp/x/csi.sock"))
    ... grpc.insecure_channel(handle.endpoint) ...
    handle.stop()

:func:`start_server` is the start-up order: build the :class:`Plugin` (driver selection,
state store, the peer dialer), run start-up recovery (:func:`csi.services.recovery.recover`),
start the metrics endpoint, the export socket and the peer listener if asked, bind the
socket, serve, and only then report ready (Probe).
:func:`build_server` turns a :class:`ServeConfig` and a :class:`Plugin` into a
``grpc.Server`` with the services behind the one error seam (:func:`csi.services.listen.new_server`);
:func:`add_listeners` binds the endpoint. Extend :class:`ServeConfig` and
:func:`add_listeners` for more listeners.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from csi import __version__
from csi.backup import sweep_temporaries
from csi.graphdriver.registry import DRIVER_CLASSES
from csi.errors import InvalidArgument
from csi.kube import incluster_api_client, resolve_driver
from csi.peers.bulk import BulkServer, TicketBook
from csi.peers.dial import CachingDialer, StaticDialer
from csi.peers.kubedial import KubernetesDialer, host_port
from csi.peers.tls import TlsFiles, split_address, token_from_file
from csi.proto import csi_pb2_grpc
from csi.services.controller import ControllerService
from csi.services.forwarder import forwarded_controller
from csi.services.snapshot_metadata import SnapshotMetadataService, peer_service
from csi.services.group import GroupControllerService
from csi.services.identity import IdentityService
from csi.services.export import (BulkLane, ExportBackend, TcpExportConfig, export_socket_path, start_tcp_export,
                                 start_unix_export)
from csi.services.metrics import Metrics, MetricsEndpoint, serve_metrics
from csi.services.listen import (key_values, node_addresses, DEFAULT_DRIVER_NAME, Running, add_common_flags, configure_logging, listen_unix,
                                 new_server, run_until_signalled, socket_path)
from csi.services.node import NodeService
from csi.services.plugin import Plugin, PluginConfig
from csi.services.recovery import recover

log = logging.getLogger("strata.serve")
DEFAULT_ROOT = Path("strata-data")
DEFAULT_AUDIENCES = ("strata-peer", "strata-export")  # strata-export: tokens made before the channel was one


@dataclass(frozen=True)
class ServeConfig:
    root: Path = DEFAULT_ROOT
    endpoint: str = ""  # "" -> unix://<root>/csi.sock
    node_id: str = field(default_factory=socket.gethostname)
    driver: str = "auto"
    driver_name: str = DEFAULT_DRIVER_NAME
    max_volumes_per_node: int = 0
    workers: int = 16
    grace_seconds: float = 30.0
    storage_opts: tuple[tuple[str, str], ...] = ()  # layered driver options (--storage-opt KEY=VALUE)
    metrics_address: str = ""  # HOST:PORT or :PORT of the Prometheus endpoint; "" = off
    peer_listen: str = ""  # HOST:PORT of the node's one TCP listener (TLS + tokens); "" = unix sockets only
    tls_cert: str = ""  # PEM certificate of the peer listener
    tls_key: str = ""
    peer_audiences: tuple[str, ...] = DEFAULT_AUDIENCES  # token audiences asked of TokenReview
    peer_accounts: tuple[str, ...] = ()  # namespace/name of strata's node ServiceAccounts (trusted peers)
    controller_accounts: tuple[str, ...] = ()  # namespace/name of strata's controller ServiceAccounts
    export_importers: tuple[str, ...] = ()  # more ServiceAccounts allowed to ImportDiff
    tls_ca: str = ""  # CA bundle of the peers' certificates (dialing other nodes); "" = no dialer
    token_file: str = ""  # this process's projected ServiceAccount token (dialing other nodes)
    peer_server_name: str = ""  # name checked in the peers' certificate ("" = the address)
    peer_port: int = 0  # peers' listener port (0: the port of peer_listen)
    node_addresses: tuple[tuple[str, str], ...] = ()  # static NODE -> HOST:PORT instead of the API
    bulk_port: int = 0  # the bulk lane's port beside peer_listen (0: any free one, -1: no lane)
    digest_snapshots: bool | None = None  # hash new snapshots in the background (None: with peer_listen)

    def socket_path(self) -> Path:
        return socket_path(self.endpoint or f"unix://{Path(self.root).resolve() / 'csi.sock'}")

    def plugin_config(self) -> PluginConfig:
        return PluginConfig(root=Path(self.root).resolve(), node_id=self.node_id, driver=self.driver,
                            driver_name=self.driver_name, max_volumes_per_node=self.max_volumes_per_node,
                            driver_options=dict(self.storage_opts),
                            digest_snapshots=bool(self.peer_listen) if self.digest_snapshots is None
                            else self.digest_snapshots)


def build_server(config: ServeConfig, plugin: Plugin, metrics: Metrics | None = None) -> grpc.Server:
    server = new_server(config.workers, "csi", observer=metrics.observe_rpc if metrics else None)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(plugin), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(plugin), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(plugin), server)
    csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerService(plugin), server)
    csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(plugin), server)
    return server


def peer_port(config: ServeConfig) -> int:
    """The port other nodes listen on: ``peer_port``, else the port of ``peer_listen``."""
    if config.peer_port:
        return config.peer_port
    _, _, port = config.peer_listen.rpartition(":")
    return int(port) if port.isdigit() else 0


def build_dialer(config: ServeConfig) -> CachingDialer | None:
    """How this node reaches the others, or None when ``tls_ca``/``token_file`` are not set."""
    if not (config.tls_ca and config.token_file):
        return None
    try:
        ca = Path(config.tls_ca).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read CA bundle {config.tls_ca}: {exc.strerror}") from exc
    token = token_from_file(config.token_file)
    if config.node_addresses:
        return StaticDialer(dict(config.node_addresses), ca, token, config.peer_server_name)
    port = peer_port(config)
    if not port:
        raise InvalidArgument("dialing other nodes needs --peer-port (or --peer-listen HOST:PORT)")
    return KubernetesDialer(port, ca, token, config.peer_server_name)


def start_exports(config: ServeConfig, plugin: Plugin,
                  metrics: Metrics | None = None) -> list[grpc.Server | BulkServer]:
    """The Diff export service on ``export.sock`` beside the CSI socket (0600, for a sidecar in
    the pod), and with ``peer_listen`` the node's one TCP listener: TLS, ServiceAccount tokens,
    the Diff export service and the forwarded Controller calls; beside it (``bulk_port`` >= 0)
    the bulk lane its OpenExport tickets are redeemed on (:mod:`csi.peers.bulk`)."""
    backend = ExportBackend(plugin.driver, config.node_id, plugin.index, plugin.digests)
    servers: list[grpc.Server | BulkServer] = [start_unix_export(backend, export_socket_path(config.socket_path()))[0]]
    if config.peer_listen:
        tls = TlsFiles(Path(config.tls_cert), Path(config.tls_key))
        try:
            lane = None
            if config.bulk_port >= 0:
                host = split_address(config.peer_listen)[0]  # a malformed address fails here first
                bulk = BulkServer(host_port(host, config.bulk_port), tls, TicketBook())
                servers.append(bulk)
                lane = BulkLane(bulk.tickets, bulk.port)
            tcp, port = start_tcp_export(backend, TcpExportConfig(
                config.peer_listen, tls,
                audiences=config.peer_audiences, importers=config.export_importers, driver_name=config.driver_name,
                peers=config.peer_accounts, controllers=config.controller_accounts), incluster_api_client,
                services=[forwarded_controller(ControllerService(plugin)), peer_service(plugin)],
                observer=metrics.observe_rpc if metrics else None, lane=lane)
        except BaseException:
            for server in servers:
                server.stop(0)
            raise
        log.info("peer listener on %s (port %d): TLS, tokens for %s%s", config.peer_listen, port,
                 ", ".join(config.peer_audiences), f"; bulk lane on port {lane.port}" if lane else "")
        servers.append(tcp)
    return servers


def add_listeners(server: grpc.Server, config: ServeConfig) -> str:
    """Bind the unix socket owner-only; return the endpoint clients use."""
    return listen_unix(server, config.socket_path())


@dataclass
class ServerHandle:
    """A running plugin server."""

    config: ServeConfig
    plugin: Plugin
    server: grpc.Server
    endpoint: str
    metrics: Metrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    export_servers: tuple[grpc.Server | BulkServer, ...] = ()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish, release the store."""
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        for export in self.export_servers:
            export.stop(self.config.grace_seconds if grace is None else grace).wait()
        export_socket_path(self.config.socket_path()).unlink(missing_ok=True)
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()
        self.plugin.close()
        close = getattr(self.plugin.dialer, "close", None)
        if close is not None:
            close()
        try:
            self.config.socket_path().unlink()
        except FileNotFoundError:
            pass


def start_server(config: ServeConfig) -> ServerHandle:
    """Build the plugin (driver selection), recover, then serve ``config.endpoint``."""
    dialer = build_dialer(config)
    plugin = Plugin(config.plugin_config(), dialer=dialer)
    metrics = Metrics(config.node_id) if config.metrics_address else None
    endpoint_metrics: MetricsEndpoint | None = None
    exports: list[grpc.Server] = []
    try:
        if metrics is not None:
            metrics.record_reconciliation(plugin.driver.recovered)
        recover(plugin.store, plugin.driver)
        sweep_temporaries(plugin.driver)  # layers a killed import left (csi.backup.index)
        plugin.index.forget_missing(plugin.driver)  # export records of layers deleted meanwhile
        server = build_server(config, plugin, metrics)
        if metrics is not None:  # before the socket: a port in use fails start-up cleanly
            metrics.watch(plugin.root, plugin.driver)
            endpoint_metrics = serve_metrics(config.metrics_address, metrics.registry)
        exports = start_exports(config, plugin, metrics)  # before the socket too: a bad listener fails cleanly
        endpoint = add_listeners(server, config)
        server.start()
        os.chmod(config.socket_path(), 0o600)
    except BaseException:
        if endpoint_metrics is not None:
            endpoint_metrics.stop()
        for export in exports:
            export.stop(0)
        plugin.close()
        if dialer is not None:
            dialer.close()
        raise
    plugin.ready.set()
    log.info("serving CSI %s %s on %s (node %s, driver %s chosen by %s)", config.driver_name, __version__, endpoint,
             config.node_id, plugin.driver.name, plugin.selection.reason)
    return ServerHandle(config, plugin, server, endpoint, metrics, endpoint_metrics, tuple(exports))


def _accounts(parser: argparse.ArgumentParser, flag: str, values: list[str]) -> tuple[str, ...]:
    for value in values:
        namespace, sep, name = value.partition("/")
        if not sep or not namespace or not name or "/" in name:
            parser.error(f"{flag} {value!r} must be NAMESPACE/NAME")
    return tuple(values)


def parse_args(argv: list[str]) -> tuple[ServeConfig, str]:
    parser = argparse.ArgumentParser(prog="strata serve", description="Run the strata CSI plugin.")
    parser.add_argument("--endpoint", default="", help="unix:///PATH/csi.sock (default: <root>/csi.sock)")
    parser.add_argument("--node-id", default=socket.gethostname(), help="this node's ID (default: host name)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="state and layer directory (default: ./strata-data)")
    parser.add_argument("--driver", default="auto", choices=["auto", *sorted(DRIVER_CLASSES)],
                        help="layered driver (default: auto)")
    parser.add_argument("--max-volumes", type=int, default=0, help="max volumes per node (0: no limit)")
    parser.add_argument("--storage-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="layered driver option, repeatable (e.g. dm.thinpooldev=/dev/mapper/POOL)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to drain calls on SIGTERM")
    add_common_flags(parser)
    peer = parser.add_argument_group("node-to-node channel (one TCP listener: TLS + ServiceAccount tokens)")
    peer.add_argument("--peer-listen", "--export-listen", dest="peer_listen", default="", metavar="HOST:PORT",
                      help="serve the Diff export service and the forwarded Controller calls here "
                           "(default: only export.sock beside the CSI socket)")
    peer.add_argument("--tls-cert", "--export-tls-cert", dest="tls_cert", default="",
                      help="PEM certificate for --peer-listen")
    peer.add_argument("--tls-key", "--export-tls-key", dest="tls_key", default="", help="PEM key for --peer-listen")
    peer.add_argument("--peer-audience", "--export-audience", dest="peer_audience", action="append", default=[],
                      help="token audience asked of TokenReview (repeatable; default strata-peer, strata-export)")
    peer.add_argument("--peer-account", action="append", default=[], metavar="NAMESPACE/NAME",
                      help="strata's node ServiceAccount: a trusted peer (repeatable)")
    peer.add_argument("--controller-account", action="append", default=[], metavar="NAMESPACE/NAME",
                      help="strata controller's ServiceAccount: may call the forwarded Controller calls (repeatable)")
    peer.add_argument("--export-importer", action="append", default=[], metavar="NAMESPACE/NAME",
                      help="another ServiceAccount allowed to ImportDiff over TCP (repeatable)")
    peer.add_argument("--tls-ca", default="", help="CA bundle of the peers' certificates (enables dialing peers)")
    peer.add_argument("--token-file", default="",
                      help="this pod's projected ServiceAccount token, sent to peers (re-read per call)")
    peer.add_argument("--peer-server-name", default="", help="name checked in the peers' certificate")
    peer.add_argument("--peer-port", type=int, default=0, help="peers' listener port (default: --peer-listen's)")
    peer.add_argument("--node-address", action="append", default=[], metavar="NODE=HOST:PORT",
                      help="a peer's address instead of its Node's InternalIP (repeatable)")
    peer.add_argument("--bulk-port", type=int, default=0,
                      help="port of the bulk lane beside --peer-listen, where other nodes fetch layer bytes with "
                           "tickets the channel hands out (default 0: any free port; -1: no lane, bytes go "
                           "through ExportDiff)")
    peer.add_argument("--digest-snapshots", choices=("auto", "yes", "no"), default="auto",
                      help="hash each new snapshot's layers in the background at low priority, so its first "
                           "restore on another node or backup need not (default auto: with --peer-listen)")
    parser.add_argument("--metrics-address", default="",
                        help="HOST:PORT or :PORT to serve Prometheus metrics on /metrics (default: off)")
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
    args = parser.parse_args(argv)
    if args.peer_listen and not (args.tls_cert and args.tls_key):
        parser.error("--peer-listen needs --tls-cert and --tls-key")
    if bool(args.tls_ca) != bool(args.token_file):
        parser.error("dialing peers needs both --tls-ca and --token-file")
    if not 0 <= args.peer_port < 65536:
        parser.error("--peer-port must be 1-65535")
    if not -1 <= args.bulk_port < 65536:
        parser.error("--bulk-port must be -1, 0 or a port")
    table = node_addresses(parser, args.node_address)
    storage_opts = key_values(parser, "--storage-opt", args.storage_opt)
    config = ServeConfig(root=Path(args.root), endpoint=args.endpoint, node_id=args.node_id, driver=args.driver,
                         driver_name=args.driver_name, max_volumes_per_node=args.max_volumes,
                         grace_seconds=args.grace, storage_opts=tuple(storage_opts),
                         metrics_address=args.metrics_address, peer_listen=args.peer_listen,
                         tls_cert=args.tls_cert, tls_key=args.tls_key,
                         peer_audiences=tuple(args.peer_audience) or DEFAULT_AUDIENCES,
                         peer_accounts=_accounts(parser, "--peer-account", args.peer_account),
                         controller_accounts=_accounts(parser, "--controller-account", args.controller_account),
                         export_importers=_accounts(parser, "--export-importer", args.export_importer),
                         tls_ca=args.tls_ca, token_file=args.token_file, peer_server_name=args.peer_server_name,
                         peer_port=args.peer_port, node_addresses=tuple(table), bulk_port=args.bulk_port,
                         digest_snapshots={"auto": None, "yes": True, "no": False}[args.digest_snapshots])
    return config, args.log_level


def main(argv: list[str]) -> int:
    config, level = parse_args(argv)
    configure_logging(level)

    def start() -> Running:
        resolved = replace(config, driver=resolve_driver(config.driver, config.node_id))
        handle = start_server(resolved)
        return Running(f"strata {__version__} serving {handle.endpoint} (node {resolved.node_id}, driver "
                       f"{handle.plugin.driver.name})", handle.stop, resolved.grace_seconds)

    return run_until_signalled(start, log)
