"""Node label and InternalIP lookups through the official Kubernetes client.

There is no API server here, so a small HTTP server on 127.0.0.1 stands in for one: it
answers ``GET /api/v1/nodes/NAME`` with the API responses stored in ``api_responses/``
(Node objects and Status errors in the v1 API's JSON format, written for these tests),
and records the requests and the bearer token it saw. The kubernetes client, its
deserialisation and error handling are the real ones; only the server is a stand-in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes import client

from csi.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from csi.peers.kubedial import KubernetesDialer, host_port
from csi.kube import ENV_LABEL, driver_from_node_label, node_internal_ip, resolve_driver

RESPONSES = Path(__file__).parent / "api_responses"
ROUTES = {
    "/api/v1/nodes/node-labelled": (200, "node-labelled.json"),
    "/api/v1/nodes/node-plain": (200, "node-plain.json"),
    "/api/v1/nodes/node-vfs": (200, "node-vfs.json"),
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
    before = len(api_server.requests)
    assert resolve_driver("auto", "node-labelled", {**env, "STRATA_DRIVER": "vfs"}, api) == "vfs"  # explicit by env
    assert len(api_server.requests) == before


def test_outside_a_cluster_there_is_no_in_cluster_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(FailedPrecondition, match="in-cluster"):
        driver_from_node_label("node-a")


def test_internal_ip_for_the_peer_dialer(api_server: FakeApiServer) -> None:
    api = api_server.api_client()
    assert node_internal_ip("node-labelled", api) == "10.0.3.17"
    assert node_internal_ip("node-plain", api) == "fd00:10::17"
    with pytest.raises(NotFound, match="no InternalIP"):
        node_internal_ip("node-typo", api)
    # the dialer formats HOST:PORT, bracketing IPv6, caches, and reads the Node again after forget()
    assert host_port("10.0.3.17", 9839) == "10.0.3.17:9839" and host_port("fd00:10::17", 9839) == "[fd00:10::17]:9839"
    dialer = KubernetesDialer(9839, b"", None, api_client=api)
    before = len(api_server.requests)
    assert dialer.address("node-labelled") == "10.0.3.17:9839"
    assert dialer.address("node-labelled") == "10.0.3.17:9839"
    assert dialer.address("node-plain") == "[fd00:10::17]:9839"
    assert len(api_server.requests) == before + 2
    dialer.forget("node-labelled")
    assert dialer.address("node-labelled") == "10.0.3.17:9839"
    assert len(api_server.requests) == before + 3
    # a Node that is gone, or has no address, cannot be reached: Unavailable naming it
    for node in ("node-gone", "node-typo"):
        with pytest.raises(Unavailable, match=node):
            dialer.address(node)


def kubeconfig_for(api_server: FakeApiServer, path: Path) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: stand-in, cluster: {{server: "{api_server.url}"}}}}]
users: [{{name: strata, user: {{token: {TOKEN}}}}}]
contexts: [{{name: stand-in, context: {{cluster: stand-in, user: strata}}}}]
current-context: stand-in
""")
    return path


def serve_with_label(api_server: FakeApiServer, tmp: Path, node: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, ENV_LABEL: "strata.csi.dev/driver", "KUBECONFIG": str(kubeconfig_for(api_server, tmp / "kc"))}
    for name in ("KUBERNETES_SERVICE_HOST", "STRATA_DRIVER"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "csi.cli", "serve", "--root", str(tmp / node), "--node-id", node,
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_strata_serve_takes_its_driver_from_the_node_label(api_server: FakeApiServer, ext4_dir: Path) -> None:
    """The real ``strata serve`` process, configured as the chart configures it (label name in
    the environment, ``--driver`` left at auto), asks the API server stand-in for its Node and
    serves with the driver the label names (vfs, where auto would choose overlay on ext4)."""
    before = len(api_server.requests)
    proc = serve_with_label(api_server, ext4_dir, "node-vfs")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "driver vfs)" in line, line + proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert ("/api/v1/nodes/node-vfs", f"Bearer {TOKEN}") in api_server.requests[before:]
    # a label naming no driver stops start-up, naming the label; no socket is left behind
    bad = serve_with_label(api_server, ext4_dir, "node-typo")
    out, err = bad.communicate(timeout=60)
    assert bad.returncode == 1 and "strata.csi.dev/driver" in err, err
    assert not (ext4_dir / "node-typo" / "csi.sock").exists()
    # an explicit --driver wins without a lookup
    before = len(api_server.requests)
    explicit = serve_with_label(api_server, ext4_dir, "node-vfs2", "--driver", "overlay")
    try:
        assert explicit.stdout is not None
        assert "driver overlay)" in explicit.stdout.readline()
    finally:
        explicit.send_signal(signal.SIGTERM)
        explicit.wait(timeout=60)
    assert len(api_server.requests) == before
