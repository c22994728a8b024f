"""Fixtures of the backup tests (imported by tests/backup/conftest.py and by other folders' conftests;
tests import values from here by this unique name, never from ``conftest``): real registries,
drivers with content, tree comparison.

* ``registry`` — Debian's ``docker-registry`` (CNCF distribution 2.8) on 127.0.0.1, anonymous,
  filesystem storage in a fresh directory, deletes enabled.
* ``registry_basic`` — the same with distribution's native ``htpasswd`` auth (bcrypt entries,
  real basic auth, the challenge flow of the real server).
* ``registry_token`` — the same with distribution's ``token`` auth. The token *server* is a
  **stand-in** written here (:class:`TokenServer`: checks basic credentials and issues RS256
  JWTs signed by a self-signed certificate the registry trusts through ``rootcertbundle``):
  no real token server (Harbor core, docker_auth) exists on this machine. The registry side —
  the 401 challenge, the JWT verification, the scope checks — is the real distribution code.
* ``driver`` — parametrised over vfs on ext4 and overlay on ext4 (``new_driver``); btrfs is
  used by one test through the session loop-file fixture.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from csi.graphdriver.registry import new_driver

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "backup-user", "s3cret-Pa55"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:port
    storage: Path
    auth: str  # "none" | "basic" | "token"

    def ref(self, repo: str, tag: str | None = None, digest: str | None = None) -> str:
        return f"oci://{self.host}/{repo}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    def docker_config(self) -> bytes:
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return json.dumps({"auths": {self.host: {"auth": auth}}}).encode()


def _start_registry(tmp: Path, auth_yaml: str, auth: str) -> Iterator[Registry]:
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip("docker-registry is not installed (apt package docker-registry)")
    port = _free_port()
    storage = tmp / "storage"
    storage.mkdir()
    config = tmp / "config.yml"
    config.write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {uuid.uuid4().hex}
{auth_yaml}""")
    log = open(tmp / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code in (200, 401):
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start: " + (tmp / "registry.log").read_text()[-2000:])
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", storage, auth)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    d = tmp_path / "registry"
    d.mkdir()
    yield from _start_registry(d, "", "none")


@pytest.fixture
def registry_basic(tmp_path: Path) -> Iterator[Registry]:
    import bcrypt

    d = tmp_path / "registry-basic"
    d.mkdir()
    htpasswd = d / "htpasswd"
    htpasswd.write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)) + b"\n")
    yield from _start_registry(d, f"auth:\n  htpasswd:\n    realm: strata-test\n    path: {htpasswd}\n", "basic")


class TokenServer:
    """A stand-in token server (see the module docstring): GET /token?service=&scope= with
    basic auth; grants the requested actions to USER only; RS256 JWT with an ``x5c`` header."""

    def __init__(self, directory: Path, service: str, issuer: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
        import datetime

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "strata test token issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.bundle = directory / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = self.cert.public_bytes(serialization.Encoding.DER)
        self.service, self.issuer = service, issuer
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                header = self.headers.get("Authorization", "")
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if header != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
                server.requests.append(" ".join(scopes))
                token = server.token(scopes)
                body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.der).decode()]}
        claims = {"iss": self.issuer, "sub": USER, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(sig)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    d = tmp_path / "token"
    d.mkdir()
    server = TokenServer(d, "strata-test-registry", "strata-test-issuer")
    yield server
    server.close()


@pytest.fixture
def registry_token(tmp_path: Path, token_server: TokenServer) -> Iterator[Registry]:
    d = tmp_path / "registry-token"
    d.mkdir()
    auth = (f"auth:\n  token:\n    realm: {token_server.url}\n    service: {token_server.service}\n"
            f"    issuer: {token_server.issuer}\n    rootcertbundle: {token_server.bundle}\n")
    yield from _start_registry(d, auth, "token")


# ---------------------------------------------------------------------- drivers and content


@pytest.fixture(params=["vfs", "overlay"])
def driver(request: pytest.FixtureRequest, ext4_dir: Path) -> Iterator[object]:
    drv = new_driver(ext4_dir / "root", request.param).driver
    yield drv
    drv.cleanup()


