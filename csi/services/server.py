"""``strata serve``: the CSI plugin on a unix socket.

Usage::

    strata serve [--endpoint unix:///PATH/csi.sock] [--node-id NAME] [--root DIR]
                 [--driver auto|vfs|overlay|aufs|btrfs|devicemapper] [--driver-name strata.csi.dev]
                 [--max-volumes N] [--storage-opt KEY=VALUE ...] [--log-level info] [--version]

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

:func:`build_server` turns a :class:`ServeConfig` and a :class:`Plugin` into a
``grpc.Server`` with the services and the RPC interceptor; :func:`add_listeners`
binds the endpoint. Extend :class:`ServeConfig` and :func:`add_listeners` for more listeners.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import stat
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from csi import __version__
from csi.errors import InvalidArgument, StrataError
from csi.graphdriver.registry import DRIVER_CLASSES
from csi.proto import csi_pb2_grpc
from csi.services.controller import ControllerService
from csi.services.identity import IdentityService
from csi.services.node import NodeService
from csi.services.plugin import DEFAULT_DRIVER_NAME, Plugin, PluginConfig
from csi.services.rpclog import RpcInterceptor

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

    def socket_path(self) -> Path:
        return socket_path(self.endpoint or f"unix://{Path(self.root).resolve() / 'csi.sock'}")

    def plugin_config(self) -> PluginConfig:
        return PluginConfig(root=Path(self.root).resolve(), node_id=self.node_id, driver=self.driver,
                            driver_name=self.driver_name, max_volumes_per_node=self.max_volumes_per_node,
                            driver_options=dict(self.storage_opts))


def socket_path(endpoint: str) -> Path:
    """``unix:///abs/path`` or ``unix:path`` -> the socket path; anything else is refused."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    else:
        raise InvalidArgument(f"endpoint {endpoint!r} must be unix:///PATH/csi.sock")
    if not path:
        raise InvalidArgument(f"endpoint {endpoint!r} names no socket path")
    return Path(path).resolve()


def build_server(config: ServeConfig, plugin: Plugin) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="csi"),
                         interceptors=[RpcInterceptor()])
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(plugin), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(plugin), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(plugin), server)
    return server


def add_listeners(server: grpc.Server, config: ServeConfig) -> str:
    """Bind the unix socket owner-only; return the endpoint clients use."""
    path = config.socket_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()  # a stale socket of an earlier run
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise StrataError(f"cannot listen on unix://{path}")
    finally:
        os.umask(old)
    return f"unix://{path}"


@dataclass
class ServerHandle:
    """A running plugin server."""

    config: ServeConfig
    plugin: Plugin
    server: grpc.Server
    endpoint: str
    forward_server: grpc.Server | None = None

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish, release the store."""
        if self.forward_server is not None:
            self.forward_server.stop(self.config.grace_seconds if grace is None else grace).wait()
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()
        self.plugin.close()
        try:
            self.config.socket_path().unlink()
        except FileNotFoundError:
            pass


def start_server(config: ServeConfig) -> ServerHandle:
    """Build the plugin (driver selection + recovery), then serve ``config.endpoint``."""
    plugin = Plugin(config.plugin_config())
    forward_server = None
    try:
        server = build_server(config, plugin)
        if config.forward_listen:  # before the socket exists, so a bad listener fails start-up cleanly
            from csi.services.forwarder import start_forward_listener

            forward_server = start_forward_listener(config.forward_listen, Path(config.forward_token_file),
                                                    ControllerService(plugin))
        endpoint = add_listeners(server, config)
        server.start()
        os.chmod(config.socket_path(), 0o600)
    except BaseException:
        if forward_server is not None:
            forward_server.stop(0)
        plugin.close()
        raise
    log.info("serving CSI %s %s on %s (node %s, driver %s)", config.driver_name, __version__, endpoint,
             config.node_id, plugin.driver.name)
    return ServerHandle(config, plugin, server, endpoint, forward_server)


def parse_args(argv: list[str]) -> tuple[ServeConfig, str]:
    parser = argparse.ArgumentParser(prog="strata serve", description="Run the strata CSI plugin.")
    parser.add_argument("--endpoint", default="", help="unix:///PATH/csi.sock (default: <root>/csi.sock)")
    parser.add_argument("--node-id", default=socket.gethostname(), help="this node's ID (default: host name)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="state and layer directory (default: ./strata-data)")
    parser.add_argument("--driver", default="auto", choices=["auto", *sorted(DRIVER_CLASSES)],
                        help="layered driver (default: auto)")
    parser.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME, help="CSI driver name")
    parser.add_argument("--max-volumes", type=int, default=0, help="max volumes per node (0: no limit)")
    parser.add_argument("--storage-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="layered driver option, repeatable (e.g. dm.thinpooldev=/dev/mapper/POOL)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to drain calls on SIGTERM")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--forward-listen", default="",
                        help="HOST:PORT to accept ControllerExpandVolume forwarded by `strata controller`")
    parser.add_argument("--forward-token-file", default="", help="shared token file for --forward-listen")
    parser.add_argument("--version", action="version", version=f"strata {__version__}")
    args = parser.parse_args(argv)
    if args.forward_listen and not args.forward_token_file:
        parser.error("--forward-listen needs --forward-token-file")
    storage_opts = []
    for opt in args.storage_opt:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            parser.error(f"--storage-opt {opt!r}: expected KEY=VALUE")
        storage_opts.append((key.strip(), value.strip()))
    config = ServeConfig(root=Path(args.root), endpoint=args.endpoint, node_id=args.node_id, driver=args.driver,
                         driver_name=args.driver_name, max_volumes_per_node=args.max_volumes,
                         grace_seconds=args.grace, forward_listen=args.forward_listen,
                         forward_token_file=args.forward_token_file, storage_opts=tuple(storage_opts))
    return config, args.log_level


def main(argv: list[str]) -> int:
    config, level = parse_args(argv)
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        from csi.kube import resolve_driver

        config = replace(config, driver=resolve_driver(config.driver, config.node_id))
        handle = start_server(config)
    except StrataError as exc:
        log.error("cannot start: %s", exc)
        return 1
    print(f"strata {__version__} serving {handle.endpoint} (node {config.node_id}, driver "
          f"{handle.plugin.driver.name})", flush=True)
    stop.wait()
    log.info("signal received: draining in-flight calls (up to %.0fs)", config.grace_seconds)
    handle.stop()
    log.info("stopped")
    return 0
