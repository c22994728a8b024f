"""One strata node for the content-source tests, as a real process: ``strata serve``'s own
start-up (:func:`csi.services.server.start_server`) on a unix socket, with

* the plugin given a :class:`csi.peers.dial.StaticDialer` to the other nodes (TLS, the test's
  CA, no token), as the server's node-to-node wiring passes its dialer to ``Plugin``;
* a stand-in for the node's TLS peer listener on ``--listen``: the Diff export service with
  the unix socket's policy (every snapshot by handle or layer ID) and the CSI Controller (for
  the freeze a cross-node clone asks of the owner), with the node's real bulk lane beside it
  (:mod:`csi.peers.bulk`, any free port), so layers travel as they do between served nodes.
  No token check: the channel's own authentication is tested with its listener; here the
  subject is what travels over it.

Usage: node_main.py --root R --socket S --node-id N --driver D --listen HOST:PORT
                    --cert C --key K --ca CA --peer NODE=HOST:PORT ...
Prints ``READY`` on stdout once both listeners serve; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from csi.peers.bulk import BulkServer, TicketBook
from csi.peers.dial import StaticDialer
from csi.peers.tls import TlsFiles, listen_tls
from csi.proto import csi_pb2_grpc, export_pb2_grpc
from csi.services import server as srv
from csi.services.controller import ControllerService
from csi.services.export import BulkLane, DiffExportService, ExportBackend, LocalAccess
from csi.services.listen import configure_logging, new_server
from csi.services.plugin import Plugin


def main() -> int:
    p = argparse.ArgumentParser()
    for flag in ("--root", "--socket", "--node-id", "--driver", "--listen", "--cert", "--key", "--ca"):
        p.add_argument(flag, required=True)
    p.add_argument("--peer", action="append", default=[])
    args = p.parse_args()
    configure_logging("info")
    peers = dict(item.split("=", 1) for item in args.peer)
    dialer = StaticDialer(peers, Path(args.ca), None, server_name="localhost")
    srv.Plugin = lambda config, dialer=None, _d=dialer: Plugin(config, dialer=_d)  # type: ignore[assignment,misc]
    handle = srv.start_server(srv.ServeConfig(root=Path(args.root), endpoint=f"unix://{args.socket}",
                                              node_id=args.node_id, driver=args.driver, grace_seconds=2))
    peer = new_server(8, "peer-standin")
    backend = ExportBackend(handle.plugin.driver, args.node_id, handle.plugin.index, handle.plugin.digests)
    tls = TlsFiles(Path(args.cert), Path(args.key))
    bulk = BulkServer(f"{args.listen.rpartition(':')[0]}:0", tls, TicketBook())
    export_pb2_grpc.add_DiffExportServicer_to_server(
        DiffExportService(backend, LocalAccess(), BulkLane(bulk.tickets, bulk.port)), peer)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(handle.plugin), peer)
    listen_tls(peer, args.listen, tls)
    peer.start()
    print("READY", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    peer.stop(1).wait()
    bulk.stop(1).wait()
    handle.stop(2)
    dialer.close()
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
