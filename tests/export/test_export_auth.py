"""Who may call the export service on TCP: TLS, ServiceAccount tokens, per-snapshot authorization.

There is no API server here, so a small HTTP server on 127.0.0.1 stands in for one, as in
``tests/deploy/test_nodelabel.py``: it answers TokenReview and SubjectAccessReview POSTs and
VolumeSnapshot / VolumeSnapshotContent GETs with the API responses stored in
``api_responses/`` (objects in the v1 APIs' JSON format, written for these tests). Which stored
answer a review gets is chosen by the token / the user and resource the request names, and
every request body is recorded so the tests check what strata asked. The ``kubernetes`` client,
its (de)serialisation and error handling, gRPC, TLS (certificates made by the test) and the
driver (vfs) are real; only the API server is a stand-in.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from kubernetes import client

from export_helpers import NODE, SNAP0, SNAP1, make_snapshots  # isort: skip
from tls_helpers import make_pki  # isort: skip

from csi.backup.index import ExportIndex
from csi.graphdriver.registry import new_driver
from csi.peers.auth import TokenAuthInterceptor, TokenReviewer, allow_service_accounts
from csi.peers.tls import TlsFiles, client_channel, listen_tls, token_from_file
from csi.proto import export_pb2 as pb, export_pb2_grpc
from csi.services.export import (DiffExportService, ExportBackend, LocalAccess, TcpExportConfig, start_tcp_export)
from csi.services.listen import new_server
from csi.services.volume_ids import make_id

RESPONSES = Path(__file__).parent / "api_responses"
AGENT_TOKEN = "eyJhbGciOiJSUzI1NiJ9.agent-token-0f9e8d7c6b5a49382716.signature-AGENT"
NODE_TOKEN = "eyJhbGciOiJSUzI1NiJ9.node-token-1a2b3c4d5e6f70819293.signature-NODE"
AUDIENCE_TOKEN = "eyJhbGciOiJSUzI1NiJ9.audience-token-99887766554433.signature-AUD"
REVOKED_TOKEN = "eyJhbGciOiJSUzI1NiJ9.revoked-token-1234567890abcdef.signature-REV"
TOKENS = {AGENT_TOKEN: "tokenreview-backup-agent.json", NODE_TOKEN: "tokenreview-strata-node.json",
          AUDIENCE_TOKEN: "tokenreview-other-audience.json"}
AGENT = "system:serviceaccount:backup:agent"
READABLE = {("apps", "daily"), ("apps", "pending"), ("apps", "gone")}  # what the agent's Role grants
GETS = {
    "/apis/snapshot.storage.k8s.io/v1/namespaces/apps/volumesnapshots/daily": "volumesnapshot-daily.json",
    "/apis/snapshot.storage.k8s.io/v1/namespaces/apps/volumesnapshots/pending": "volumesnapshot-pending.json",
    "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/snapcontent-7b1f0d2e-3c4a-4b5d-8e6f-9a0b1c2d3e4f":
        "volumesnapshotcontent-daily.json",
}


@dataclass
class FakeApiServer:
    url: str
    posts: list[tuple[str, dict]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": "Bearer strata-own-token"}
        return client.ApiClient(configuration)

    def reviews(self, kind: str) -> list[dict]:
        return [body for path, body in self.posts if path.endswith(kind)]


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer("")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, name: str, spec: dict | None = None) -> None:
            body = (RESPONSES / name).read_bytes()
            if spec is not None:  # the API server echoes the request's spec in its answer
                body = json.dumps({**json.loads(body), "spec": spec}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            fake.gets.append(path)
            name = GETS.get(path)
            self._answer(200, name) if name else self._answer(404, "not-found.json")

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.posts.append((path, body))
            if path == "/apis/authentication.k8s.io/v1/tokenreviews":
                self._answer(201, TOKENS.get(body["spec"]["token"], "tokenreview-rejected.json"), body["spec"])
            elif path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
                spec = body["spec"]
                attrs = spec.get("resourceAttributes", {})
                allowed = (spec.get("user") == AGENT and attrs.get("verb") == "get"
                           and attrs.get("group") == "snapshot.storage.k8s.io"
                           and attrs.get("resource") == "volumesnapshots"
                           and (attrs.get("namespace"), attrs.get("name")) in READABLE)
                self._answer(201, "sar-allowed.json" if allowed else "sar-denied.json", spec)
            else:
                self._answer(404, "not-found.json")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Tcp:
    address: str
    ca: Path
    driver: object
    api: FakeApiServer

    def stub(self, token: str | None) -> export_pb2_grpc.DiffExportStub:
        return export_pb2_grpc.DiffExportStub(client_channel(self.address, self.ca, token))


@pytest.fixture
def tcp(ext4_dir: Path, tmp_path: Path, api_server: FakeApiServer) -> Iterator[Tcp]:
    drv = new_driver(ext4_dir / "root", "vfs").driver
    make_snapshots(drv)
    pki = make_pki(tmp_path / "pki")
    backend = ExportBackend(drv, NODE, ExportIndex(tmp_path / "backup-index.json"))
    config = TcpExportConfig("127.0.0.1:0", TlsFiles(pki.cert, pki.key), audiences=("strata-export",),
                             importers=("strata/strata-node",), driver_name="strata.csi.dev")
    server, port = start_tcp_export(backend, config, api_server.api_client())
    try:
        yield Tcp(f"localhost:{port}", pki.ca, drv, api_server)
    finally:
        server.stop(0).wait()
        drv.cleanup()


def daily(name: str = "daily") -> pb.SnapshotRef:
    return pb.SnapshotRef(namespace="apps", name=name)


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()  # type: ignore[operator]
        if isinstance(result, Iterator):
            list(result)
    return info.value.code()


def test_authorized_caller_exports_over_tls(tcp: Tcp) -> None:
    stub = tcp.stub(AGENT_TOKEN)
    chain = stub.GetChain(pb.GetChainRequest(snapshot=daily()))
    assert [l.id for l in chain.layers] == [make_id(SNAP0, NODE), make_id(SNAP1, NODE)]
    messages = list(stub.ExportDiff(pb.ExportDiffRequest(snapshot=daily(), base=make_id(SNAP0, NODE))))
    data = b"".join(m.data for m in messages)
    assert messages[-1].summary.diff_id == chain.layers[1].digest and len(data) == chain.layers[1].tar_size
    # what strata asked the API: the token with its audience, then get on that VolumeSnapshot
    review = tcp.api.reviews("tokenreviews")[0]["spec"]
    assert review == {"token": AGENT_TOKEN, "audiences": ["strata-export"]}
    sar = tcp.api.reviews("subjectaccessreviews")[0]["spec"]
    assert sar["user"] == AGENT and sar["uid"] == "5a0f3c2e-8d6b-4f7e-9a41-3b2c1d0e9f87"
    assert "system:serviceaccounts:backup" in sar["groups"]
    assert sar["extra"]["authentication.kubernetes.io/pod-name"] == ["agent-7d9f8c6b5-x2kqp"]
    assert sar["resourceAttributes"] == {"verb": "get", "group": "snapshot.storage.k8s.io",
                                         "resource": "volumesnapshots", "namespace": "apps", "name": "daily"}
    assert "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/" \
           "snapcontent-7b1f0d2e-3c4a-4b5d-8e6f-9a0b1c2d3e4f" in tcp.api.gets
    # the TokenReview answer is cached briefly: two calls, one review
    assert len(tcp.api.reviews("tokenreviews")) == 1


def test_missing_bad_and_misdirected_tokens_are_unauthenticated(tcp: Tcp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    request = pb.GetChainRequest(snapshot=daily())
    assert code_of(lambda: tcp.stub(None).GetChain(request)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: tcp.stub(REVOKED_TOKEN).GetChain(request)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: tcp.stub(AUDIENCE_TOKEN).GetChain(request)) == grpc.StatusCode.UNAUTHENTICATED
    streamed = pb.ExportDiffRequest(snapshot=daily())
    assert code_of(lambda: tcp.stub(REVOKED_TOKEN).ExportDiff(streamed)) == grpc.StatusCode.UNAUTHENTICATED
    # nothing was resolved or authorized for them
    assert tcp.api.reviews("subjectaccessreviews") == [] and tcp.api.gets == []
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "strata.rpc"]
    codes = [line["code"] for line in lines if "code" in line]
    assert codes.count("UNAUTHENTICATED") == 4
    for token in (REVOKED_TOKEN, AUDIENCE_TOKEN):
        assert not [r for r in caplog.records if token in r.getMessage() or token.split(".")[1] in r.getMessage()]


def test_forbidden_snapshot_and_bare_ids(tcp: Tcp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    stub = tcp.stub(AGENT_TOKEN)
    secret = pb.SnapshotRef(namespace="finance", name="ledger")
    assert code_of(lambda: stub.GetChain(pb.GetChainRequest(snapshot=secret))) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: stub.ExportDiff(pb.ExportDiffRequest(snapshot=secret))) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert not [g for g in tcp.api.gets if "finance" in g]  # refused before anything was read
    # a bare handle cannot be authorized over TCP, even a real one
    bare = pb.SnapshotRef(snapshot_id=make_id(SNAP1, NODE))
    assert code_of(lambda: stub.DiffSize(pb.DiffSizeRequest(snapshot=bare))) == grpc.StatusCode.INVALID_ARGUMENT
    # readable but not bound yet; readable but absent
    assert code_of(lambda: stub.DiffSize(pb.DiffSizeRequest(snapshot=daily("pending")))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stub.DiffSize(pb.DiffSizeRequest(snapshot=daily("gone")))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.DiffSize(pb.DiffSizeRequest(snapshot=pb.SnapshotRef(namespace="apps", name="../x")))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if AGENT_TOKEN in r.getMessage()]


def test_import_is_for_strata_only(tcp: Tcp) -> None:
    messages = list(tcp.stub(AGENT_TOKEN).ExportDiff(pb.ExportDiffRequest(snapshot=daily())))  # all of SNAP1
    blob, summary = b"".join(m.data for m in messages), messages[-1].summary

    def requests() -> Iterator[pb.ImportDiffRequest]:
        yield pb.ImportDiffRequest(header=pb.ImportHeader(diff_id=summary.diff_id))
        yield pb.ImportDiffRequest(data=blob)

    before = sorted(l.id for l in tcp.driver.layers())  # type: ignore[attr-defined]
    assert code_of(lambda: tcp.stub(AGENT_TOKEN).ImportDiff(requests())) == grpc.StatusCode.PERMISSION_DENIED
    assert sorted(l.id for l in tcp.driver.layers()) == before  # type: ignore[attr-defined]
    answer = tcp.stub(NODE_TOKEN).ImportDiff(requests())  # strata's own ServiceAccount
    assert answer.layer_id == "oci-" + summary.diff_id.split(":")[1] and not answer.existed
    assert tcp.driver.layer(answer.layer_id).frozen  # type: ignore[attr-defined]


def test_plain_tcp_and_untrusted_servers_are_refused(tcp: Tcp, tmp_path: Path) -> None:
    plain = export_pb2_grpc.DiffExportStub(grpc.insecure_channel(tcp.address))
    code = code_of(lambda: plain.GetChain(pb.GetChainRequest(snapshot=daily()), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE
    other = make_pki(tmp_path / "other-ca")
    stranger = export_pb2_grpc.DiffExportStub(client_channel(tcp.address, other.ca, AGENT_TOKEN))
    assert code_of(lambda: stranger.GetChain(pb.GetChainRequest(snapshot=daily()), timeout=10)) \
        == grpc.StatusCode.UNAVAILABLE
    assert tcp.api.posts == []  # the token never left the client


def test_unreachable_api_server_is_unavailable(ext4_dir: Path, tmp_path: Path) -> None:
    drv = new_driver(ext4_dir / "root", "vfs").driver
    pki = make_pki(tmp_path / "pki")
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: connection refused
    configuration.retries = 0
    server, port = start_tcp_export(ExportBackend(drv, NODE), TcpExportConfig("127.0.0.1:0",
                                    TlsFiles(pki.cert, pki.key)), client.ApiClient(configuration))
    try:
        stub = export_pb2_grpc.DiffExportStub(client_channel(f"localhost:{port}", pki.ca, AGENT_TOKEN))
        assert code_of(lambda: stub.GetChain(pb.GetChainRequest(snapshot=daily()))) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0).wait()
        drv.cleanup()


def test_node_to_node_authorizer_admits_strata_service_accounts_only(
        ext4_dir: Path, tmp_path: Path, api_server: FakeApiServer) -> None:
    """The shared interceptor with an authorizer callback, as the node-to-node channel (issue 12)
    uses it: every handler kind refuses a ServiceAccount that is not strata's; the token is read
    from a file on every call (projected tokens rotate)."""
    drv = new_driver(ext4_dir / "root", "vfs").driver
    make_snapshots(drv)
    pki = make_pki(tmp_path / "pki")
    reviewer = TokenReviewer(api_server.api_client(), ("strata-export",), cache_seconds=0)
    server = new_server(4, "peer", interceptors=[TokenAuthInterceptor(reviewer,
                                                                      allow_service_accounts("strata/strata-node"))])
    export_pb2_grpc.add_DiffExportServicer_to_server(DiffExportService(ExportBackend(drv, NODE), LocalAccess()), server)
    port = listen_tls(server, "127.0.0.1:0", TlsFiles(pki.cert, pki.key))
    server.start()
    token_file = tmp_path / "token"
    try:
        stub = export_pb2_grpc.DiffExportStub(client_channel(f"localhost:{port}", pki.ca,
                                                             token_from_file(token_file)))
        ref = pb.SnapshotRef(snapshot_id=make_id(SNAP1, NODE))
        token_file.write_text(AGENT_TOKEN + "\n")
        calls = [lambda: stub.GetChain(pb.GetChainRequest(snapshot=ref)),
                 lambda: stub.ExportDiff(pb.ExportDiffRequest(snapshot=ref)),
                 lambda: stub.ImportDiff(iter([pb.ImportDiffRequest(header=pb.ImportHeader())]))]
        assert [code_of(c) for c in calls] == [grpc.StatusCode.PERMISSION_DENIED] * 3
        token_file.write_text(NODE_TOKEN + "\n")  # rotated: the next call sends the new token
        assert len(stub.GetChain(pb.GetChainRequest(snapshot=ref)).layers) == 2
        assert [r["spec"]["token"] for r in api_server.reviews("tokenreviews")][-1] == NODE_TOKEN
    finally:
        server.stop(0).wait()
        drv.cleanup()


def test_certificate_rotation_is_picked_up(tcp: Tcp, tmp_path: Path) -> None:
    """The server re-reads its key pair when the files change (a Secret volume's rotation)."""
    # tcp's server reads tmp_path/pki; a new CA's pair replaces it
    new = make_pki(tmp_path / "rotated")
    pki_dir = tmp_path / "pki"
    for name in ("tls.crt", "tls.key"):
        tmp = pki_dir / f".{name}.new"
        tmp.write_bytes((new.cert if name == "tls.crt" else new.key).read_bytes())
        os.replace(tmp, pki_dir / name)
    fresh = export_pb2_grpc.DiffExportStub(client_channel(tcp.address, new.ca, AGENT_TOKEN))
    assert len(fresh.GetChain(pb.GetChainRequest(snapshot=daily()), timeout=10).layers) == 2
    stale = export_pb2_grpc.DiffExportStub(client_channel(tcp.address, tcp.ca, AGENT_TOKEN))
    assert code_of(lambda: stale.GetChain(pb.GetChainRequest(snapshot=daily()), timeout=10)) \
        == grpc.StatusCode.UNAVAILABLE
