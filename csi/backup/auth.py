"""Registry credentials from a docker config JSON (a Kubernetes ``dockerconfigjson`` Secret).

Accepted shape (the one ``kubectl create secret docker-registry`` writes, and
``~/.docker/config.json``)::

    {"auths": {"<registry>": {"auth": base64("user:password")}
                              | {"username": "...", "password": "..."}
                              | {"identitytoken": "..."}  (an OAuth2 refresh token)
                              | {"registrytoken": "..."}  (a bearer token used as is)}}

``<registry>`` may be ``host``, ``host:port``, or a URL (``https://host/v1/``); a key matches a
registry when its host[:port] equals the reference's. Docker Hub's aliases
(``docker.io``, ``index.docker.io``, ``registry-1.docker.io``) match each other.

:class:`Credentials` never shows its secrets: ``repr``/``str`` print the user name only, so a
log line or a traceback that includes it leaks nothing. Parse errors never quote the input.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from csi.errors import InvalidArgument

_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


@dataclass(frozen=True)
class Credentials:
    """Credentials for one registry. Secrets are excluded from repr and comparison output."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token for the token endpoint
    registry_token: str = field(default="", repr=False)  # a bearer token sent as is

    @property
    def basic(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username or self.password else None

    def __str__(self) -> str:
        return f"credentials of user {self.username!r}" if self.username else "token credentials"


ANONYMOUS = Credentials()


def _host_of(key: str) -> str:
    if "://" in key:
        return urlsplit(key).netloc.lower()
    return key.split("/", 1)[0].lower()


def _normal(host: str) -> str:
    host = host.lower()
    return "docker.io" if host in _HUB else host


@dataclass(frozen=True)
class DockerConfig:
    """The ``auths`` map of a docker config, by normalised host[:port]."""

    auths: Mapping[str, Credentials] = field(default_factory=dict)

    def for_host(self, host: str) -> Credentials:
        return self.auths.get(_normal(host), ANONYMOUS)

    def __repr__(self) -> str:
        return f"DockerConfig(hosts={sorted(self.auths)})"


def _entry(host: str, entry: object) -> Credentials:
    if not isinstance(entry, dict):
        raise InvalidArgument(f"docker config: the entry of {host!r} is not an object")
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise InvalidArgument(f"docker config: 'auth' of {host!r} is not a string")
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument(f"docker config: 'auth' of {host!r} is not base64 of 'user:password'") from None
        if ":" not in decoded:
            raise InvalidArgument(f"docker config: 'auth' of {host!r} does not decode to 'user:password'")
        username, _, password = decoded.partition(":")
    for name, value in (("username", username), ("password", password)):
        if not isinstance(value, str):
            raise InvalidArgument(f"docker config: {name} of {host!r} is not a string")
    identity = entry.get("identitytoken") or ""
    registry_token = entry.get("registrytoken") or ""
    if not isinstance(identity, str) or not isinstance(registry_token, str):
        raise InvalidArgument(f"docker config: a token of {host!r} is not a string")
    return Credentials(username, password, identity, registry_token)


def parse_docker_config(data: bytes | str) -> DockerConfig:
    """Parse a docker config JSON document (the ``.dockerconfigjson`` key of a Secret)."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise InvalidArgument("docker config is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("docker config is not a JSON object")
    auths = obj.get("auths", {})
    if not isinstance(auths, dict):
        raise InvalidArgument("docker config: 'auths' is not an object")
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        host = _host_of(str(key))
        if not host:
            raise InvalidArgument("docker config: an 'auths' key names no host")
        out[_normal(host)] = _entry(host, entry)
    return DockerConfig(out)


def load_docker_config(path: str | Path) -> DockerConfig:
    """Read and parse a docker config file (e.g. a mounted Secret's ``.dockerconfigjson``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read docker config {path}: {exc.strerror}") from exc
    return parse_docker_config(data)
