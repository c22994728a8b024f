"""What every strata gRPC server process shares: the socket, the seam, the flags, the
signal-draining ``main`` loop. ``strata serve`` (:mod:`csi.services.server`) and
``strata controller`` (:mod:`csi.services.forwarder`) are both built from these.

Contract:

* :func:`new_server` — a ``grpc.Server`` whose every handler, unary or streaming, goes
  through the one error seam and RPC log (:class:`csi.services.rpclog.RpcInterceptor`);
  extra interceptors (e.g. a token check) run inside it, so their refusals are logged and
  mapped like any error.
* :func:`socket_path` — ``unix:///abs/path`` or ``unix:path`` -> the socket path; anything
  else is INVALID_ARGUMENT. :func:`listen_unix` binds it owner-only (umask 0177), replacing
  a stale socket of an earlier run but never anything that is not a socket.
* :func:`add_common_flags` — ``--driver-name`` (default :data:`DEFAULT_DRIVER_NAME`, the
  CSI driver name, defined here once) and ``--log-level``; :func:`configure_logging`.
* :func:`run_until_signalled` — SIGTERM or SIGINT stop accepting calls and let in-flight
  ones finish (up to the server's grace) before exit 0; a start-up that raises a strata
  error logs it and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi.errors import InvalidArgument, StrataError
from csi.services.rpclog import Observer, RpcInterceptor

DEFAULT_DRIVER_NAME = "strata.csi.dev"
LOG_LEVELS = ("debug", "info", "warning", "error")


def new_server(workers: int, thread_prefix: str,
               interceptors: Sequence[grpc.ServerInterceptor] = (), observer: Observer | None = None) -> grpc.Server:
    """A gRPC server with the error seam around every handler (and ``interceptors`` inside it);
    ``observer`` hears of every call (:class:`csi.services.rpclog.RpcInterceptor`)."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
                       interceptors=[RpcInterceptor(observer), *interceptors])


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


def listen_unix(server: grpc.Server, path: Path) -> str:
    """Bind ``path`` owner-only; return the endpoint clients use."""
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


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME, help="CSI driver name")
    parser.add_argument("--log-level", default="info", choices=list(LOG_LEVELS))


def node_addresses(parser: argparse.ArgumentParser, entries: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--node-address NODE=HOST:PORT`` values; a malformed one is a usage error."""
    table = []
    for entry in entries:
        node, sep, address = entry.partition("=")
        if not sep or not node or ":" not in address:
            parser.error(f"--node-address {entry!r} must be NODE=HOST:PORT")
        table.append((node, address))
    return tuple(table)


def key_values(parser: argparse.ArgumentParser, flag: str, entries: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--flag KEY=VALUE`` values (``--storage-opt``); a malformed one is a usage error."""
    pairs = []
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            parser.error(f"{flag} {entry!r}: expected KEY=VALUE")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


@dataclass(frozen=True)
class Running:
    """A started server as :func:`run_until_signalled` sees it."""

    banner: str  # printed on stdout once serving (scripts and tests wait for it)
    stop: Callable[[], None]  # drain in-flight calls and release everything
    grace_seconds: float


def run_until_signalled(start: Callable[[], Running], log: logging.Logger) -> int:
    """Run ``start``, serve until SIGTERM/SIGINT, then drain; the exit status."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        running = start()
    except StrataError as exc:
        log.error("cannot start: %s", exc)
        return 1
    print(running.banner, flush=True)
    stop.wait()
    log.info("signal received: draining in-flight calls (up to %.0fs)", running.grace_seconds)
    running.stop()
    log.info("stopped")
    return 0
