"""A gRPC client run *inside* a node's network namespace (``host.run([python, peer_client.py, …])``):
the test process cannot reach the namespaces' addresses, and gRPC makes its sockets in its own
threads, so a client that crosses the test network is a process. It makes one call and prints
one JSON line: ``{"code": "OK" | status name, "details": …, "result": …}``.

    peer_client.py ADDRESS --ca CA [--token-file F] [--server-name N] [--plain] CALL ARGS…

CALLs: ``chain SNAPSHOT_ID`` · ``chain-vs NAMESPACE NAME`` · ``export SNAPSHOT_ID [BASE]``
(result: blob bytes, sha256 of the blob, the summary's digest) · ``import-probe PARENT DIFF_ID``
(a header-only ImportDiff) · ``expand VOLUME_ID BYTES`` · ``modify VOLUME_ID KEY=VALUE…`` ·
the bulk lane (OpenExport over the channel, then the lane's TLS socket): ``bulk SNAPSHOT_ID
[BASE]`` (as ``export``), ``bulk-twice SNAPSHOT_ID`` (the same ticket redeemed twice: the
second's error), ``bulk-forged SNAPSHOT_ID`` (a ticket never issued), ``bulk-plain
SNAPSHOT_ID`` (the ticket sent over plain TCP: what came back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from csi.errors import StrataError  # noqa: E402
from csi.peers.bulk import receive  # noqa: E402
from csi.peers.tls import client_channel, client_context, token_from_file  # noqa: E402
from csi.proto import csi_pb2, csi_pb2_grpc, export_pb2, export_pb2_grpc  # noqa: E402


def read_until_closed(sock: socket.socket) -> bytes:
    """What arrives until the peer closes (or resets) the connection."""
    got = b""
    try:
        while piece := sock.recv(65536):
            got += piece
    except ConnectionResetError:  # a TLS server refusing what is not TLS may reset
        pass
    return got


def fetch(address: str, ca: str, server_name: str, port: int, ticket: str) -> dict[str, Any]:
    """One ticket's stream on the lane at ``port`` of ``address``'s host."""
    host = address.rpartition(":")[0].strip("[]")
    sock = client_context(Path(ca)).wrap_socket(socket.create_connection((host, port), timeout=20),
                                                server_hostname=server_name or host)
    frames = receive(sock, ticket)
    blob, size = hashlib.sha256(), 0
    while True:
        try:
            data = next(frames)
        except StopIteration as end:
            summary = export_pb2.ExportSummary.FromString(end.value)
            return {"bytes": size, "sha256": "sha256:" + blob.hexdigest(), "summary_digest": summary.digest}
        blob.update(data)
        size += len(data)


def bulk(export: export_pb2_grpc.DiffExportStub, name: str, args: list[str], options: argparse.Namespace) -> Any:
    request = export_pb2.ExportDiffRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=args[0]),
                                           base=args[1] if len(args) > 1 else "")
    answer = export.OpenExport(request, timeout=20)
    lane = (options.address, options.ca, options.server_name, answer.port)
    if name == "bulk":
        return fetch(*lane, answer.ticket)
    if name == "bulk-plain":
        host = options.address.rpartition(":")[0].strip("[]")
        with socket.create_connection((host, answer.port), timeout=20) as plain:
            plain.sendall(b"STRATA-BULK/1 " + answer.ticket.encode() + b"\n")
            got = read_until_closed(plain)
        return {"data_frame": got[:1] == b"D", "bytes": len(got)}
    first = fetch(*lane, answer.ticket) if name == "bulk-twice" else None
    try:
        fetch(*lane, answer.ticket if name == "bulk-twice" else "ab" * 32)
    except StrataError as exc:
        return {"first": first, "error": type(exc).__name__, "message": str(exc), "ticket": answer.ticket}
    return {"first": first, "error": None}


def call(channel: grpc.Channel, name: str, args: list[str], options: argparse.Namespace) -> Any:
    export = export_pb2_grpc.DiffExportStub(channel)
    if name.startswith("bulk"):
        return bulk(export, name, args, options)
    controller = csi_pb2_grpc.ControllerStub(channel)
    if name == "chain":
        answer = export.GetChain(export_pb2.GetChainRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=args[0])),
                                 timeout=20)
        return {"node": answer.node_id, "driver": answer.driver, "layers": [l.id for l in answer.layers],
                "digests": [l.digest for l in answer.layers]}
    if name == "chain-vs":
        answer = export.GetChain(export_pb2.GetChainRequest(
            snapshot=export_pb2.SnapshotRef(namespace=args[0], name=args[1])), timeout=20)
        return {"node": answer.node_id, "layers": [l.id for l in answer.layers]}
    if name == "export":
        request = export_pb2.ExportDiffRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=args[0]),
                                               base=args[1] if len(args) > 1 else "")
        blob = hashlib.sha256()
        size, summary = 0, ""
        for message in export.ExportDiff(request, timeout=60):
            blob.update(message.data)
            size += len(message.data)
            if message.HasField("summary"):
                summary = message.summary.digest
        return {"bytes": size, "sha256": "sha256:" + blob.hexdigest(), "summary_digest": summary}
    if name == "import-probe":
        header = export_pb2.ImportHeader(parent=args[0], diff_id=args[1], media_type=args[2] if len(args) > 2 else
                                         "application/vnd.oci.image.layer.v1.tar")
        answer = export.ImportDiff(iter([export_pb2.ImportDiffRequest(header=header)]), timeout=20)
        return {"existed": answer.existed}
    if name == "expand":
        answer = controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=args[0], capacity_range=csi_pb2.CapacityRange(required_bytes=int(args[1]))), timeout=20)
        return {"capacity_bytes": answer.capacity_bytes}
    if name == "modify":
        params = dict(a.split("=", 1) for a in args[1:])
        controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
            volume_id=args[0], mutable_parameters=params), timeout=20)
        return {}
    raise SystemExit(f"unknown call {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--ca", default="")
    parser.add_argument("--token-file", default="")
    parser.add_argument("--server-name", default="")
    parser.add_argument("--plain", action="store_true", help="plain TCP, no TLS")
    parser.add_argument("call")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.plain:
        channel = grpc.insecure_channel(args.address)
        metadata_token = Path(args.token_file).read_text().strip() if args.token_file else ""
        if metadata_token:  # a plain channel cannot carry call credentials: send the header by hand
            channel = grpc.intercept_channel(channel, _Header(metadata_token))
    else:
        channel = client_channel(args.address, Path(args.ca), token_from_file(args.token_file) if args.token_file
                                 else None, server_name=args.server_name or None)
    try:
        print(json.dumps({"code": "OK", "details": "", "result": call(channel, args.call, args.args, args)}))
    except grpc.RpcError as exc:
        print(json.dumps({"code": exc.code().name, "details": exc.details() or "", "result": None}))


class _Header(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self.token), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self.token), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method: str, timeout: Any, metadata: Any, credentials: Any, wait_for_ready: Any,
                 compression: Any) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def _with_metadata(details: Any, token: str) -> Any:
    metadata = list(details.metadata or ()) + [("authorization", f"Bearer {token}")]
    return _Details(details.method, details.timeout, metadata, details.credentials,
                    getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


if __name__ == "__main__":
    main()
