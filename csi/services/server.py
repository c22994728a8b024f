"""``strata serve``: the CSI plugin on a unix socket.

Usage::

    strata serve [--endpoint unix:///PATH/csi.sock] [--node-id NAME] [--root DIR]
                 [--driver auto|vfs|overlay|aufs|btrfs|devicemapper] [--driver-name strata.csi.dev]
                 [--max-volumes N] [--storage-opt KEY=VALUE ...] [--metrics-address :9840]
                 [--log-level info] [--version]

Defaults work on a laptop: root ``./strata-data``, the socket inside it, node ID the
host name, driver chosen by the registry (vfs when nothing better fits). With ``--driver
auto`` and ``STRATA_NODE_DRIVER_LABEL`` set (the Helm chart sets it), the Node label of
that name picks the driver (:func:`csi.kube.resolve_driver`), read once at start-up.
``--storage-opt`` (repeatable, as Docker's) passes options to the layered driver, e.g.
``dm.thinpooldev=/dev/mapper/POOL`` for devicemapper.
The socket is created owner-only (0600). SIGTERM or SIGINT stop accepting calls, let
in-flight calls finish (up to ``--grace`` seconds) and exit 0.

For programs (tests, benchmarks, the demo)::

    handle = start_server(ServeConfig(root=..., endpoint="unix:///tmp/x/csi.sock"))
    ... grpc.insecure_channel(handle.endpoint) ...
    handle.stop()

:func:`start_server` is the start-up order: build the :class:`Plugin` (driver selection,
state store), run start-up recovery (:func:`csi.services.recovery.recover`), start the
forward listener if asked, bind the socket, serve, and only then report ready (Probe).
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
from csi.backup import ExportIndex, sweep_temporaries
from csi.graphdriver.registry import DRIVER_CLASSES, home_of
from csi.kube import incluster_api_client, resolve_driver
from csi.peers.tls import TlsFiles
from csi.proto import csi_pb2_grpc
from csi.services.controller import ControllerService
from csi.services.forwarder import start_forward_listener
from csi.services.group import GroupControllerService
from csi.services.identity import IdentityService
from csi.services.export import (ExportBackend, TcpExportConfig, export_socket_path, start_tcp_export,
                                 start_unix_export)
from csi.services.metrics import Metrics, MetricsEndpoint, serve_metrics
from csi.services.listen import (DEFAULT_DRIVER_NAME, Running, add_common_flags, configure_logging, listen_unix,
                                 new_server, run_until_signalled, socket_path)
from csi.services.node import NodeService
from csi.services.plugin import Plugin, PluginConfig
from csi.services.recovery import recover

log = logging.getLogger("strata.serve")
DEFAULT_ROOT = Path("strata-data")


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
    forward_listen: str = ""  # HOST:PORT of the expansion forward listener (csi.services.forwarder); "" = none
    forward_token_file: str = ""
    storage_opts: tuple[tuple[str, str], ...] = ()  # layered driver options (--storage-opt KEY=VALUE)
    metrics_address: str = ""  # HOST:PORT or :PORT of the Prometheus endpoint; "" = off
    export_listen: str = ""  # HOST:PORT of the Diff export service over TLS with tokens; "" = unix socket only
    export_tls_cert: str = ""
    export_tls_key: str = ""
    export_audiences: tuple[str, ...] = ("strata-export",)
    export_importers: tuple[str, ...] = ()  # namespace/name of ServiceAccounts allowed to ImportDiff

    def socket_path(self) -> Path:
        return socket_path(self.endpoint or f"unix://{Path(self.root).resolve() / 'csi.sock'}")

    def plugin_config(self) -> PluginConfig:
        return PluginConfig(root=Path(self.root).resolve(), node_id=self.node_id, driver=self.driver,
                            driver_name=self.driver_name, max_volumes_per_node=self.max_volumes_per_node,
                            driver_options=dict(self.storage_opts))


def build_server(config: ServeConfig, plugin: Plugin, metrics: Metrics | None = None) -> grpc.Server:
    server = new_server(config.workers, "csi", observer=metrics.observe_rpc if metrics else None)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(plugin), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(plugin), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(plugin), server)
    csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerService(plugin), server)
    return server


def start_exports(config: ServeConfig, plugin: Plugin) -> list[grpc.Server]:
    """The Diff export service: always on ``export.sock`` beside the CSI socket (0600, for a
    sidecar in the pod), and with ``export_listen`` on TCP with TLS and ServiceAccount tokens."""
    index = ExportIndex(home_of(plugin.root, plugin.driver.name) / "backup-index.json")
    backend = ExportBackend(plugin.driver, config.node_id, index)
    servers = [start_unix_export(backend, export_socket_path(config.socket_path()))[0]]
    if config.export_listen:
        try:
            tcp, _ = start_tcp_export(backend, TcpExportConfig(
                config.export_listen, TlsFiles(Path(config.export_tls_cert), Path(config.export_tls_key)),
                audiences=config.export_audiences, importers=config.export_importers,
                driver_name=config.driver_name), incluster_api_client)
        except BaseException:
            servers[0].stop(0)
            raise
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
    forward_server: grpc.Server | None = None
    metrics: Metrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    export_servers: tuple[grpc.Server, ...] = ()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish, release the store."""
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        for export in self.export_servers:
            export.stop(self.config.grace_seconds if grace is None else grace).wait()
        export_socket_path(self.config.socket_path()).unlink(missing_ok=True)
        if self.forward_server is not None:
            self.forward_server.stop(self.config.grace_seconds if grace is None else grace).wait()
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()
        self.plugin.close()
        try:
            self.config.socket_path().unlink()
        except FileNotFoundError:
            pass


def start_server(config: ServeConfig) -> ServerHandle:
    """Build the plugin (driver selection), recover, then serve ``config.endpoint``."""
    plugin = Plugin(config.plugin_config())
    forward_server = None
    metrics = Metrics(config.node_id) if config.metrics_address else None
    endpoint_metrics: MetricsEndpoint | None = None
    exports: list[grpc.Server] = []
    try:
        if metrics is not None:
            metrics.record_reconciliation(plugin.driver.recovered)
        recover(plugin.store, plugin.driver)
        sweep_temporaries(plugin.driver)  # layers a killed import left (csi.backup.index)
        server = build_server(config, plugin, metrics)
        if config.forward_listen:  # before the socket exists, so a bad listener fails start-up cleanly
            forward_server = start_forward_listener(config.forward_listen, Path(config.forward_token_file),
                                                    ControllerService(plugin))
        if metrics is not None:  # before the socket too: a port in use fails start-up cleanly
            metrics.watch(plugin.root, plugin.driver)
            endpoint_metrics = serve_metrics(config.metrics_address, metrics.registry)
        exports = start_exports(config, plugin)
        endpoint = add_listeners(server, config)
        server.start()
        os.chmod(config.socket_path(), 0o600)
    except BaseException:
        if forward_server is not None:
            forward_server.stop(0)
        if endpoint_metrics is not None:
            endpoint_metrics.stop()
        for export in exports:
            export.stop(0)
        plugin.close()
        raise
    plugin.ready.set()
    log.info("serving CSI %s %s on %s (node %s, driver %s chosen by %s)", config.driver_name, __version__, endpoint,
             config.node_id, plugin.driver.name, plugin.selection.reason)
    return ServerHandle(config, plugin, server, endpoint, forward_server, metrics, endpoint_metrics, tuple(exports))


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
    parser.add_argument("--forward-listen", default="",
                        help="HOST:PORT to accept ControllerExpandVolume forwarded by `strata controller`")
    parser.add_argument("--forward-token-file", default="", help="shared token file for --forward-listen")
    parser.add_argument("--export-listen", default="",
                        help="HOST:PORT for the Diff export service over TLS with ServiceAccount tokens "
                             "(default: only export.sock beside the CSI socket)")
    parser.add_argument("--export-tls-cert", default="", help="TLS certificate for --export-listen")
    parser.add_argument("--export-tls-key", default="", help="TLS key for --export-listen")
    parser.add_argument("--export-audience", action="append", default=[],
                        help="token audience asked of TokenReview (repeatable; default strata-export)")
    parser.add_argument("--export-importer", action="append", default=[], metavar="NAMESPACE/NAME",
                        help="ServiceAccount allowed to ImportDiff over TCP (repeatable)")
    parser.add_argument("--metrics-address", default="",
                        help="HOST:PORT or :PORT to serve Prometheus metrics on /metrics (default: off)")
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
    args = parser.parse_args(argv)
    if args.forward_listen and not args.forward_token_file:
        parser.error("--forward-listen needs --forward-token-file")
    if args.export_listen and not (args.export_tls_cert and args.export_tls_key):
        parser.error("--export-listen needs --export-tls-cert and --export-tls-key")
    storage_opts = []
    for opt in args.storage_opt:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            parser.error(f"--storage-opt {opt!r}: expected KEY=VALUE")
        storage_opts.append((key.strip(), value.strip()))
    config = ServeConfig(root=Path(args.root), endpoint=args.endpoint, node_id=args.node_id, driver=args.driver,
                         driver_name=args.driver_name, max_volumes_per_node=args.max_volumes,
                         grace_seconds=args.grace, forward_listen=args.forward_listen,
                         forward_token_file=args.forward_token_file, storage_opts=tuple(storage_opts),
                         metrics_address=args.metrics_address, export_listen=args.export_listen,
                         export_tls_cert=args.export_tls_cert, export_tls_key=args.export_tls_key,
                         export_audiences=tuple(args.export_audience) or ("strata-export",),
                         export_importers=tuple(args.export_importer))
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
