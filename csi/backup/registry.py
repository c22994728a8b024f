"""A registry repository as a backup target, by the OCI distribution spec (v1.1).

HTTP through ``requests`` (one ``Session`` per target: connection reuse, redirects for blob
GETs — ``requests`` drops the Authorization header when a redirect leaves the host); the
protocol steps are here because no maintained Python library streams an upload whose digest is
only known at its end (oras-py's ``upload_blob`` needs a file path and its digest before it
starts, and its monolithic PUT reads the whole file into memory).

Calls (``<base>`` = ``<scheme>://<host>/v2/<repository>``):

* ``HEAD <base>/blobs/<digest>`` — has_blob (skip what exists: incremental by construction);
* ``POST <base>/blobs/uploads/?mount=<digest>&from=<repo>`` — cross-repository mount
  (201 mounted; 202 means the registry opened an upload instead, which is cancelled);
* ``POST <base>/blobs/uploads/`` then ``PATCH <location>`` per chunk (``Content-Range:
  <start>-<end>``, at most ``chunk_size`` bytes held in memory) then ``PUT <location>&digest=<d>``
  — a streamed chunked upload, digest computed on the fly; a PATCH that fails on the network is
  resumed after asking the upload's ``Range`` (``GET <location>``); a digest that does not
  match ``expected`` cancels the upload (``DELETE <location>``);
* ``PUT/GET <base>/manifests/<tag|digest>``; a GET by digest is verified;
* ``GET <base>/blobs/<digest>`` — streamed, verified by :class:`~csi.backup.target.VerifyingReader`;
* ``DELETE <base>/manifests/<tag>`` (spec 1.1), falling back to resolving the tag and
  ``DELETE <base>/manifests/<digest>`` where the registry does not delete tags (distribution 2.x).

Authentication (the challenge flow): a 401 carries ``WWW-Authenticate``. ``Basic`` → the
credentials are sent as HTTP basic auth; ``Bearer realm=…,service=…,scope=…`` → a token is
fetched from the realm (GET with basic auth, or POST ``grant_type=refresh_token`` with an
identity token) and the request is retried with it; a fixed ``registrytoken`` is sent as is.
Tokens are cached per scope. Credentials and tokens are never logged or put in an exception
message; error messages quote the registry's error codes only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from csi.backup.auth import ANONYMOUS, Credentials
from csi.backup.media import MANIFEST, check_digest, digest_bytes
from csi.backup.target import VerifyingReader
from csi.errors import DigestMismatch, InvalidArgument, NotFound, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 8 << 20
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')
_RESUME_TRIES = 3


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``("bearer", {"realm": …, "service": …, "scope": …})`` from a WWW-Authenticate value."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _errors_of(resp: requests.Response) -> str:
    """The registry's error codes (never the request): ``BLOB_UNKNOWN, DENIED``."""
    try:
        body = resp.json()
        codes = [str(e.get("code", "?"))[:40] for e in body.get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError):
        codes = []
    return ", ".join(codes) or resp.reason or str(resp.status_code)


class _ResponseReader:
    """A streamed response body as a file-like object."""

    def __init__(self, resp: requests.Response) -> None:
        self._resp = resp
        self._raw = resp.raw

    def read(self, n: int = -1) -> bytes:
        try:
            return self._raw.read(None if n is None or n < 0 else n, decode_content=True)
        except (requests.RequestException, OSError) as exc:
            raise Unavailable(f"reading a blob failed: {type(exc).__name__}") from exc

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._resp.close()


class RegistryTarget:
    """A target on one repository of a registry (see the module docstring)."""

    def __init__(self, host: str, repository: str, *, credentials: Credentials = ANONYMOUS,
                 scheme: str = "https", chunk_size: int = DEFAULT_CHUNK, timeout: float = 60.0,
                 verify: bool | str = True, session: requests.Session | None = None) -> None:
        if chunk_size <= 0:
            raise InvalidArgument("chunk size must be positive")
        self.host, self.repository = host, repository
        self.base = f"{scheme}://{host}/v2/{repository}"
        self.root = f"{scheme}://{host}/v2/"
        self.chunk_size = chunk_size
        self.timeout = timeout
        self._credentials = credentials
        self._session = session or requests.Session()
        self._session.verify = verify
        self._session.trust_env = False  # no ~/.netrc or proxy variables deciding what is sent where
        self._tokens: dict[str, str] = {}
        self._authorization: str | None = None
        if credentials.registry_token:
            self._authorization = f"Bearer {credentials.registry_token}"

    def __repr__(self) -> str:
        return f"RegistryTarget({self.host}/{self.repository})"

    def location(self) -> str:
        return f"oci://{self.host}/{self.repository}"

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ HTTP and auth

    def _send(self, method: str, url: str, headers: dict[str, str] | None, data: bytes | None,
              stream: bool, params: dict[str, str] | None = None) -> requests.Response:
        headers = dict(headers or {})
        if self._authorization:
            headers["Authorization"] = self._authorization
        try:
            return self._session.request(method, url, headers=headers, data=data, stream=stream,
                                         timeout=self.timeout, allow_redirects=method in ("GET", "HEAD"),
                                         params=params)
        except requests.RequestException as exc:
            raise Unavailable(f"{method} {self.host}: {type(exc).__name__}") from exc

    def _request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                 data: bytes | None = None, stream: bool = False, ok: tuple[int, ...] = (200,)) -> requests.Response:
        resp = self._send(method, url, headers, data, stream)
        if resp.status_code == 401:
            resp.close()
            self._authenticate(resp.headers.get("WWW-Authenticate", ""))
            resp = self._send(method, url, headers, data, stream)
        if resp.status_code in ok:
            return resp
        try:
            self._raise(method, resp)
        finally:
            resp.close()
        raise AssertionError("unreachable")

    def _raise(self, method: str, resp: requests.Response) -> None:
        what = f"{method} {self.host}/{self.repository}: HTTP {resp.status_code} ({_errors_of(resp)})"
        if resp.status_code in (401, 403):
            raise Unauthenticated(f"{what}: the registry refused the credentials for this repository")
        if resp.status_code == 404:
            raise NotFound(what)
        if resp.status_code >= 500 or resp.status_code == 429:
            raise Unavailable(what)
        raise InvalidArgument(what)

    def _authenticate(self, header: str) -> None:
        scheme, params = parse_challenge(header)
        creds = self._credentials
        if scheme == "basic":
            if creds.basic is None:
                raise Unauthenticated(f"registry {self.host} asks for credentials and none are configured for it")
            self._authorization = requests.auth._basic_auth_str(*creds.basic)  # type: ignore[attr-defined]
            return
        if scheme != "bearer" or "realm" not in params:
            raise Unauthenticated(f"registry {self.host} sent an authentication challenge strata cannot answer")
        scope = params.get("scope", "")
        token = self._tokens.get(scope)
        if token is None:
            token = self._fetch_token(params["realm"], params.get("service", ""), scope)
            self._tokens[scope] = token
        self._authorization = f"Bearer {token}"

    def _fetch_token(self, realm: str, service: str, scope: str) -> str:
        creds = self._credentials
        query = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        try:
            if creds.identity_token:
                form = {**query, "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "strata"}
                resp = self._session.post(realm, data=form, timeout=self.timeout)
            else:
                resp = self._session.get(realm, params=query, auth=creds.basic, timeout=self.timeout)
        except requests.RequestException as exc:
            raise Unavailable(f"token endpoint of {self.host}: {type(exc).__name__}") from exc
        with resp:
            if resp.status_code in (401, 403):
                raise Unauthenticated(f"the token endpoint of {self.host} refused the credentials "
                                           f"(HTTP {resp.status_code})")
            if resp.status_code != 200:
                raise Unavailable(f"token endpoint of {self.host}: HTTP {resp.status_code}")
            try:
                body: Any = resp.json()
            except ValueError:
                body = None
        token = (body or {}).get("token") or (body or {}).get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise Unauthenticated(f"the token endpoint of {self.host} returned no token")
        return token

    # ------------------------------------------------------------------ blobs

    def has_blob(self, digest: str) -> bool:
        check_digest(digest)
        resp = self._request("HEAD", f"{self.base}/blobs/{digest}", ok=(200, 404))
        resp.close()
        return resp.status_code == 200

    def mount_blob(self, digest: str, from_locations: list[str]) -> bool:
        check_digest(digest)
        prefix = f"oci://{self.host}/"
        repos = [loc[len(prefix):] for loc in from_locations if loc.startswith(prefix)]
        for repo in dict.fromkeys(repos):
            if repo == self.repository:
                continue
            url = _with_query(f"{self.base}/blobs/uploads/", mount=digest, **{"from": repo})
            resp = self._request("POST", url, headers={"Content-Length": "0"}, ok=(201, 202))
            resp.close()
            if resp.status_code == 201:
                return True
            self._cancel(resp)  # the registry opened an upload instead
        return False

    def _location(self, resp: requests.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise Unavailable(f"registry {self.host} answered an upload step without a Location")
        return urljoin(self.root, loc)

    def _cancel(self, resp: requests.Response) -> None:
        try:
            self._request("DELETE", self._location(resp), ok=(204, 202, 200, 404)).close()
        except Exception:  # best effort: an abandoned upload expires on the registry
            log.debug("cancelling an upload on %s failed", self.host, exc_info=True)

    def put_blob(self, stream: IO[bytes], expected: str | None = None) -> tuple[str, int]:
        if expected is not None and self.has_blob(expected):
            return expected, self._blob_size(expected)
        resp = self._request("POST", f"{self.base}/blobs/uploads/", headers={"Content-Length": "0"}, ok=(202,))
        resp.close()
        location = self._location(resp)
        h, offset = hashlib.sha256(), 0
        try:
            while True:
                chunk = _read_full(stream, self.chunk_size)
                if not chunk:
                    break
                h.update(chunk)
                location = self._patch(location, chunk, offset)
                offset += len(chunk)
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(f"blob streamed to {self.host}/{self.repository} hashes to {digest}, "
                                     f"expected {expected}")
            done = self._request("PUT", _with_query(location, digest=digest),
                                 headers={"Content-Length": "0"}, ok=(201, 204))
            done.close()
        except BaseException:
            self._cancel(resp)
            raise
        return digest, offset

    def _patch(self, location: str, chunk: bytes, offset: int) -> str:
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                   "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        for attempt in range(_RESUME_TRIES):
            try:
                resp = self._request("PATCH", location, headers=headers, data=chunk, ok=(202,))
                resp.close()
                return self._location(resp)
            except Unavailable:
                if attempt == _RESUME_TRIES - 1:
                    raise
                received, location = self._upload_status(location)
                if received == offset + len(chunk):
                    return location  # the chunk arrived; only the answer was lost
                if received != offset:
                    raise
        raise AssertionError("unreachable")

    def _upload_status(self, location: str) -> tuple[int, str]:
        resp = self._request("GET", location, ok=(204,))
        resp.close()
        rng = resp.headers.get("Range", "")
        end = rng.rpartition("-")[2]
        return (int(end) + 1 if end.isdigit() else 0), self._location(resp)

    def _blob_size(self, digest: str) -> int:
        resp = self._request("HEAD", f"{self.base}/blobs/{digest}", ok=(200,))
        resp.close()
        return int(resp.headers.get("Content-Length", "0"))

    def open_blob(self, digest: str, size: int | None = None) -> IO[bytes]:
        check_digest(digest)
        resp = self._request("GET", f"{self.base}/blobs/{digest}", stream=True, ok=(200,))
        return VerifyingReader(_ResponseReader(resp), digest, size,  # type: ignore[arg-type,return-value]
                               f"blob {digest} from {self.host}/{self.repository}")

    # ------------------------------------------------------------------ manifests

    def put_manifest(self, data: bytes, tag: str | None) -> str:
        digest = digest_bytes(data)
        headers = {"Content-Type": MANIFEST}
        for ref in ([tag] if tag else []) + [digest]:
            self._request("PUT", f"{self.base}/manifests/{ref}", headers=headers, data=data, ok=(201, 200)).close()
        return digest

    def get_manifest(self, tag_or_digest: str) -> tuple[bytes, str]:
        resp = self._request("GET", f"{self.base}/manifests/{tag_or_digest}", headers={"Accept": MANIFEST}, ok=(200,))
        with resp:
            data = resp.content
        digest = digest_bytes(data)
        if tag_or_digest.startswith("sha256:") and digest != check_digest(tag_or_digest):
            raise DigestMismatch(f"manifest {tag_or_digest} from {self.host}/{self.repository} hashes to {digest}")
        return data, digest

    def delete(self, tag_or_digest: str) -> None:
        url = f"{self.base}/manifests/{tag_or_digest}"
        if tag_or_digest.startswith("sha256:"):
            check_digest(tag_or_digest)
            self._request("DELETE", url, ok=(202, 200, 204)).close()
            return
        resp = self._request("DELETE", url, ok=(202, 200, 204, 400, 405))
        resp.close()
        if resp.status_code in (400, 405):  # the registry deletes manifests by digest only
            _, digest = self.get_manifest(tag_or_digest)
            self._request("DELETE", f"{self.base}/manifests/{digest}", ok=(202, 200, 204)).close()


def _read_full(stream: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream (pipes return short reads)."""
    parts, left = [], n
    while left > 0:
        data = stream.read(left)
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)
