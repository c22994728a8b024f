"""Node label and InternalIP lookups through the official Kubernetes client.

There is no API server here, so a small HTTP server on 127.0.0.1 stands in for one: it
answers ``GET /api/v1/nodes/NAME`` with the API responses stored in ``api_responses/``
(Node objects and Status errors in the v1 API's JSON format, written for these tests),
and records the requests and the bearer token it saw. The kubernetes client, its
deserialisation and error handling are the real ones; only the server is a stand-in.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes import client

from csi.errors import FailedPrecondition, InvalidArgument, NotFound
from csi.forwarder import KubernetesAddresses
from csi.nodelabel import ENV_LABEL, driver_from_node_label, node_internal_ip, resolve_driver

RESPONSES = Path(__file__).parent / "api_responses"
ROUTES = {
    "/api/v1/nodes/node-labelled": (200, "node-labelled.json"),
    "/api/v1/nodes/node-plain": (200, "node-plain.json"),
    "/api/v1/nodes/node-typo": (200, "node-typo.json"),
    "/api/v1/nodes/node-secret": (403, "forbidden.json"),
}
TOKEN = "recorded-test-token"


@dataclass
class FakeApiServer:
    url: str
    requests: list[tuple[str, str]] = field(default_factory=list)

    def api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": f"Bearer {TOKEN}"}
        return client.ApiClient(configuration)


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeApiServer]:
    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization", "")))
            status, name = ROUTES.get(self.path.split("?")[0], (404, "not-found.json"))
            body = (RESPONSES / name).read_bytes()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeApiServer(f"http://127.0.0.1:{server.server_port}", seen)
    finally:
        server.shutdown()
        server.server_close()


def test_label_names_the_driver_and_the_request_is_authenticated(api_server: FakeApiServer) -> None:
    assert driver_from_node_label("node-labelled", api_client=api_server.api_client()) == "btrfs"
    path, auth = api_server.requests[-1]
    assert path == "/api/v1/nodes/node-labelled"
    assert auth == f"Bearer {TOKEN}"


def test_absent_label_leaves_the_choice_to_auto(api_server: FakeApiServer) -> None:
    assert driver_from_node_label("node-plain", api_client=api_server.api_client()) is None


def test_label_naming_no_driver_stops_start_up(api_server: FakeApiServer) -> None:
    with pytest.raises(InvalidArgument, match="zfs"):
        driver_from_node_label("node-typo", api_client=api_server.api_client())


def test_missing_node_and_refused_read(api_server: FakeApiServer) -> None:
    with pytest.raises(NotFound, match="node-gone"):
        driver_from_node_label("node-gone", api_client=api_server.api_client())
    with pytest.raises(FailedPrecondition, match="403"):
        driver_from_node_label("node-secret", api_client=api_server.api_client())


def test_unreachable_api_server_is_a_clear_error() -> None:
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard port: connection refused
    configuration.retries = 0
    with pytest.raises(FailedPrecondition, match="unreachable"):
        driver_from_node_label("node-a", api_client=client.ApiClient(configuration))


def test_resolve_driver_precedence(api_server: FakeApiServer) -> None:
    api = api_server.api_client()
    env = {ENV_LABEL: "strata.csi.dev/driver"}
    before = len(api_server.requests)
    assert resolve_driver("overlay", "node-labelled", env, api) == "overlay"  # explicit wins, no lookup
    assert resolve_driver("auto", "node-labelled", {}, api) == "auto"  # lookup not enabled
    assert len(api_server.requests) == before
    assert resolve_driver("auto", "node-labelled", env, api) == "btrfs"
    assert resolve_driver("auto", "node-plain", env, api) == "auto"


def test_outside_a_cluster_there_is_no_in_cluster_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(FailedPrecondition, match="in-cluster"):
        driver_from_node_label("node-a")


def test_internal_ip_for_the_forwarder(api_server: FakeApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    api = api_server.api_client()
    assert node_internal_ip("node-labelled", api) == "10.0.3.17"
    assert node_internal_ip("node-plain", api) == "fd00:10::17"
    with pytest.raises(NotFound, match="no InternalIP"):
        node_internal_ip("node-typo", api)
    # KubernetesAddresses formats HOST:PORT, bracketing IPv6.
    import csi.nodelabel

    monkeypatch.setattr(csi.nodelabel, "incluster_api_client", lambda: api)
    assert KubernetesAddresses(9820)("node-labelled") == "10.0.3.17:9820"
    assert KubernetesAddresses(9820)("node-plain") == "[fd00:10::17]:9820"
    with pytest.raises(NotFound):
        KubernetesAddresses(9820)("node-gone")

