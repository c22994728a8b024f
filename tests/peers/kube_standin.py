"""A stand-in for the Kubernetes API server, for the peer tests (there is no API server here).

A small HTTP server answers what strata asks, with the API responses stored in
``api_responses/`` (objects in the v1 APIs' JSON format, written for these tests) filled in
per request:

* ``POST /apis/authentication.k8s.io/v1/tokenreviews`` — tokens registered with
  :meth:`KubeStandIn.token` authenticate as their ServiceAccount when the audiences asked for
  intersect the token's (as the API server does: ``status.audiences`` is the intersection);
  a token with none of them gets the API server's audience error; an unknown token is rejected.
* ``POST /apis/authorization.k8s.io/v1/subjectaccessreviews`` — allowed only for the
  (user, verb, group, resource, namespace, name) tuples in :attr:`KubeStandIn.grants`.
* ``GET /api/v1/nodes/NAME`` — a Node whose InternalIP is :attr:`KubeStandIn.nodes`\\[NAME]
  (404 for a node not listed); change the entry to "move" a node.
* Any other ``GET`` — :attr:`KubeStandIn.objects`\\[path] (a dict) or 404.

Every request is recorded (:attr:`KubeStandIn.requests`: method, path, JSON body, the
``Authorization`` header) so tests check what strata asked. The kubernetes client, its
(de)serialisation and error handling are the real ones; only the server is a stand-in.

Usage::

    api = KubeStandIn.start(sock)             # sock: a listening socket (netns.bind_in), or None: 127.0.0.1
    token = api.token("strata/strata-node", audiences=("strata-peer",))
    api.nodes["node-a"] = "10.213.0.1"
    env = api.env(tmp / "kubeconfig")         # KUBECONFIG for strata processes
    ...
    api.stop()
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RESPONSES = Path(__file__).parent / "api_responses"
SA_PREFIX = "system:serviceaccount:"


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESPONSES / name).read_text())


@dataclass
class Request:
    method: str
    path: str
    body: dict[str, Any] | None
    authorization: str


@dataclass
class KubeStandIn:
    url: str
    tokens: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # token -> (username, audiences)
    grants: set[tuple[str, str, str, str, str, str]] = field(default_factory=set)
    nodes: dict[str, str] = field(default_factory=dict)  # node name -> InternalIP
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # GET path -> object
    requests: list[Request] = field(default_factory=list)
    own_token: str = field(default_factory=lambda: "standin-" + secrets.token_hex(16))
    _server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ set-up

    @classmethod
    def start(cls, sock: socket.socket | None = None) -> "KubeStandIn":
        """Serve on ``sock`` (already bound and listening, e.g. inside a namespace) or 127.0.0.1."""
        fake = cls("")
        handler = _handler(fake)
        if sock is None:
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        else:
            server = ThreadingHTTPServer(sock.getsockname(), handler, bind_and_activate=False)
            server.socket.close()
            server.socket = sock
            server.server_address = sock.getsockname()
        server.daemon_threads = True
        host, port = server.server_address[:2]
        fake.url = f"http://{host}:{port}"
        fake._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return fake

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def token(self, account: str, audiences: Iterable[str] = ("strata-peer",), *, user: str | None = None) -> str:
        """A new token of ServiceAccount ``namespace/name`` (or of ``user``) carrying ``audiences``."""
        namespace, _, name = account.partition("/")
        token = f"eyJhbGciOiJSUzI1NiJ9.{secrets.token_hex(24)}.sig"
        self.tokens[token] = (user or f"{SA_PREFIX}{namespace}:{name}", tuple(audiences))
        return token

    def grant(self, user: str, verb: str, group: str, resource: str, namespace: str = "", name: str = "") -> None:
        self.grants.add((user, verb, group, resource, namespace, name))

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig naming this server (strata's own requests carry :attr:`own_token`)."""
        path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: stand-in, cluster: {{server: "{self.url}"}}}}]
users: [{{name: strata, user: {{token: {self.own_token}}}}}]
contexts: [{{name: stand-in, context: {{cluster: stand-in, user: strata}}}}]
current-context: stand-in
""")
        return path

    def env(self, kubeconfig: Path, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a strata process that finds this server through ``KUBECONFIG``."""
        env = dict(os.environ if base is None else base)
        for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "STRATA_DRIVER", "STRATA_NODE_DRIVER_LABEL"):
            env.pop(name, None)
        env["KUBECONFIG"] = str(self.kubeconfig(kubeconfig))
        return env

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for in-process use."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": f"Bearer {self.own_token}"}
        return client.ApiClient(configuration)

    def seen(self, method: str, path_suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(path_suffix)]

    # ------------------------------------------------------------------ answers

    def token_review(self, spec: dict[str, Any]) -> dict[str, Any]:
        asked = tuple(spec.get("audiences") or ())
        known = self.tokens.get(spec.get("token", ""))
        if known is None:
            answer = _load("tokenreview-rejected.json")
        else:
            username, carried = known
            matched = [a for a in asked if a in carried] if asked else list(carried)
            if asked and not matched:
                answer = _load("tokenreview-wrong-audience.json")
                answer["status"]["error"] = (f"[invalid bearer token, token audiences {json.dumps(list(carried))} "
                                             f"is invalid for the target audiences {json.dumps(list(asked))}, unknown]")
            else:
                answer = _load("tokenreview-authenticated.json")
                user = answer["status"]["user"]
                user["username"] = username
                if username.startswith(SA_PREFIX):
                    namespace = username[len(SA_PREFIX):].split(":")[0]
                    user["groups"] = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                      "system:authenticated"]
                else:
                    user["groups"] = ["system:authenticated"]
                answer["status"]["audiences"] = matched
        answer["spec"] = spec
        return answer

    def access_review(self, spec: dict[str, Any]) -> dict[str, Any]:
        attrs = spec.get("resourceAttributes") or {}
        key = (spec.get("user", ""), attrs.get("verb", ""), attrs.get("group", ""), attrs.get("resource", ""),
               attrs.get("namespace", ""), attrs.get("name", ""))
        answer = _load("sar-allowed.json" if key in self.grants else "sar-denied.json")
        answer["spec"] = spec
        return answer

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        if path.startswith("/api/v1/nodes/"):
            name = path[len("/api/v1/nodes/"):]
            ip = self.nodes.get(name)
            if ip is None:
                return 404, json.loads((RESPONSES / "not-found.json").read_text().replace("<name>", name))
            node = json.loads((RESPONSES / "node.json").read_text().replace("<name>", name))
            for address in node["status"]["addresses"]:
                if address["type"] == "InternalIP":
                    address["address"] = ip
            return 200, node
        obj = self.objects.get(path)
        if obj is None:
            return 404, _load("not-found.json")
        return 200, copy.deepcopy(obj)


def _handler(fake: KubeStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, obj: dict[str, Any]) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            fake.requests.append(Request("GET", path, None, self.headers.get("Authorization", "")))
            self._answer(*fake.get(path))

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.requests.append(Request("POST", path, body, self.headers.get("Authorization", "")))
            if path == "/apis/authentication.k8s.io/v1/tokenreviews":
                self._answer(201, fake.token_review(body.get("spec") or {}))
            elif path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
                self._answer(201, fake.access_review(body.get("spec") or {}))
            else:
                self._answer(404, _load("not-found.json"))

        def log_message(self, *args: object) -> None:
            pass

    return Handler
