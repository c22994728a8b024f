"""TLS for strata's TCP gRPC listeners and their clients.

Contract:

* :class:`TlsFiles` — PEM paths: the server's certificate chain and key, and optionally a CA
  bundle. With ``ca`` set and ``require_client_cert``, clients must present a certificate
  signed by it (mutual TLS); otherwise the server only proves who it is and callers prove
  who they are with a token (:mod:`csi.peers.auth`).
* :func:`server_credentials` — ``grpc.ServerCredentials`` that re-read the files when their
  modification time changes (a Kubernetes Secret volume — cert-manager or a chart-made CA —
  swaps them on rotation), checked at each new TLS handshake; a half-written pair keeps the
  previous one. Missing or unreadable files at start are :class:`~csi.errors.InvalidArgument`.
* :func:`listen_tls` — bind ``HOST:PORT`` (port 0 picks one) with those credentials; returns
  the port. Plain TCP is never offered by these helpers.
* :func:`client_channel` — a secure channel to ``HOST:PORT`` trusting ``ca`` (and optionally
  overriding the name checked in the server's certificate), with a bearer token sent on every
  call from ``token`` (a string, or a callable re-read per call — a projected ServiceAccount
  token file rotates).
* The same for a plain socket (the bulk lane, :mod:`csi.peers.bulk`): :class:`ServerContexts`
  — an ``ssl.SSLContext`` for the server's files, made again when they change (as the gRPC
  credentials above); :func:`client_context` — a context trusting ``ca`` that checks the
  server's name. TLS 1.2 at least; plain TCP is never offered.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import Generic, TypeVar
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi.errors import InvalidArgument, StrataError

log = logging.getLogger("strata.peers.tls")
T = TypeVar("T")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # PEM certificate chain of this server
    key: Path  # PEM private key
    ca: Path | None = None  # PEM CA bundle for client certificates (mutual TLS)
    require_client_cert: bool = False


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN" not in data:
        raise InvalidArgument(f"TLS {what} {path} is not PEM")
    return data


def _mtimes(files: TlsFiles) -> tuple[int, ...]:
    paths = [files.cert, files.key] + ([files.ca] if files.ca else [])
    out = []
    for p in paths:
        try:
            out.append(os.stat(p).st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


def _grpc_configuration(f: TlsFiles) -> grpc.ServerCertificateConfiguration:
    pair = (_read(f.key, "key"), _read(f.cert, "certificate"))
    ca = _read(f.ca, "CA bundle") if f.ca else None
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)


def _ssl_context(f: TlsFiles) -> ssl.SSLContext:
    _read(f.cert, "certificate"), _read(f.key, "key")  # the same errors as the gRPC listener's
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(f.cert, f.key)
        if f.ca is not None:
            context.load_verify_locations(cadata=_read(f.ca, "CA bundle").decode())
    except (ssl.SSLError, OSError) as exc:
        raise InvalidArgument(f"cannot use TLS certificate {f.cert} with key {f.key}: {exc}") from exc
    if f.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Watched(Generic[T]):
    """``make(files)``, made again when the files' modification times change; a pair that
    cannot be loaded yet keeps the previous one (and is tried again at the next look)."""

    def __init__(self, files: TlsFiles, make: Callable[[TlsFiles], T]) -> None:
        if files.require_client_cert and files.ca is None:
            raise InvalidArgument("client certificates are required but no CA bundle is given")
        self.files, self._make = files, make
        self._lock = threading.Lock()
        self._seen = _mtimes(files)
        self.value = make(files)

    def changed(self) -> T | None:
        """The new value when the files changed and load, else None."""
        with self._lock:
            now = _mtimes(self.files)
            if now == self._seen:
                return None
            try:
                self.value = self._make(self.files)
            except InvalidArgument as exc:
                log.warning("TLS files changed but cannot be used yet (%s); keeping the previous ones", exc)
                return None
            self._seen = now
            log.info("TLS certificate reloaded from %s", self.files.cert)
            return self.value


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that follow rotations of ``files`` (see the module docstring)."""
    reloader = _Watched(files, _grpc_configuration)  # gRPC asks reloader.changed at each handshake
    return grpc.dynamic_ssl_server_credentials(reloader.value, reloader.changed,
                                               require_client_authentication=files.require_client_cert)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) -> ``(host, port)``; InvalidArgument otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"listen address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def listen_tls(server: grpc.Server, address: str, files: TlsFiles) -> int:
    """Bind ``address`` (``HOST:PORT``) with TLS; return the bound port."""
    split_address(address)
    bound = server.add_secure_port(address, server_credentials(files))
    if bound == 0:
        raise StrataError(f"cannot listen on {address}")
    return bound


class ServerContexts:
    """``current()``: an ``ssl.SSLContext`` serving ``files``, made again when they change."""

    def __init__(self, files: TlsFiles) -> None:
        self._watched = _Watched(files, _ssl_context)

    def current(self) -> ssl.SSLContext:
        return self._watched.changed() or self._watched.value


def client_context(ca: Path | bytes) -> ssl.SSLContext:
    """A client context trusting only ``ca`` and checking the server's name."""
    root = ca if isinstance(ca, bytes) else _read(ca, "CA bundle")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=root.decode())
    return context


TokenSource = str | Callable[[], str]


def token_from_file(path: str | os.PathLike[str]) -> Callable[[], str]:
    """A token source that re-reads ``path`` on every call (projected tokens rotate)."""

    def read() -> str:
        return Path(path).read_text(encoding="utf-8").strip()

    return read


class _BearerPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            token = self._token() if callable(self._token) else self._token
        except Exception as exc:  # noqa: BLE001 - handed to gRPC, which fails the call
            callback((), exc)
            return
        callback((("authorization", f"Bearer {token}"),), None)


def client_channel(address: str, ca: Path | bytes, token: TokenSource | None = None, *,
                   server_name: str | None = None, client_cert: tuple[Path, Path] | None = None) -> grpc.Channel:
    """A TLS channel to ``address`` trusting ``ca``, sending ``token`` as a bearer token."""
    root = ca if isinstance(ca, bytes) else _read(ca, "CA bundle")
    key = cert = None
    if client_cert is not None:
        cert, key = _read(client_cert[0], "certificate"), _read(client_cert[1], "key")
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_BearerPlugin(token)))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, creds, options=options)
