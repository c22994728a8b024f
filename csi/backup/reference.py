"""Backup references: where an artifact lives, in one strictly validated string.

Grammar (no whitespace anywhere; case matters)::

    reference   = registry-ref | layout-ref
    registry-ref= "oci://" host [":" port] "/" repository [":" tag] ["@" digest]
    layout-ref  = "oci-layout:" abs-path [":" tag] ["@" digest]
    host        = DNS name or IPv4 address ([a-zA-Z0-9-.], labels not starting/ending with "-")
    port        = 1-65535
    repository  = path-component *("/" path-component)           (the distribution spec's <name>)
    path-component = [a-z0-9]+ (("." | "_" | "__" | "-"+) [a-z0-9]+)*
    tag         = [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    digest      = "sha256:" 64 lowercase hex digits
    abs-path    = "/" followed by path segments of [A-Za-z0-9._+-] (no "." or ".." segment, no "//")

At least a tag or a digest must be present. A *restore* needs the digest (the content is then
fixed: :meth:`Reference.require_digest`); a *backup* needs a tag or writes by digest only.
``ref.with_digest(d)`` gives the immutable reference a backup returns. ``http://`` is used for
registries on loopback addresses, https everywhere else (:attr:`Reference.scheme`), unless the
caller says otherwise when it opens the target.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from csi.backup.media import check_digest
from csi.errors import InvalidArgument

REGISTRY_SCHEME = "oci://"
LAYOUT_SCHEME = "oci-layout:"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._+-]+")
_REPOSITORY_MAX = 255


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``kind`` is "registry" or "layout"; for a layout ``host`` is ""
    and ``repository`` is the layout directory's absolute path."""

    kind: str
    host: str  # "host" or "host:port"
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def scheme(self) -> str:
        hostname = self.host.rsplit(":", 1)[0] if self.host.count(":") == 1 else self.host
        try:
            loopback = ipaddress.ip_address(hostname).is_loopback
        except ValueError:
            loopback = hostname == "localhost"
        return "http" if loopback else "https"

    def require_digest(self) -> str:
        if self.digest is None:
            raise InvalidArgument(f"reference {self} names no digest: a restore needs '@sha256:...' "
                                  "(a tag can move; the content must be fixed)")
        return self.digest

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=check_digest(digest))

    def __str__(self) -> str:
        head = f"{REGISTRY_SCHEME}{self.host}/{self.repository}" if self.kind == "registry" \
            else f"{LAYOUT_SCHEME}{self.repository}"
        return head + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def _split_tag_digest(rest: str, text: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        check_digest(digest, f"digest of reference {text[:120]!r}")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if _TAG.fullmatch(tag) is None:
            raise InvalidArgument(f"reference {text[:120]!r}: tag {tag[:140]!r} is malformed "
                                  "(expected [A-Za-z0-9_][A-Za-z0-9._-]{0,127})")
    return rest, tag, digest


def _check_host(host: str, text: str) -> None:
    name, sep, port = host.rpartition(":") if ":" in host else (host, "", "")
    if sep:
        if not port.isdigit() or not 0 < int(port) < 65536 or port.startswith("0"):
            raise InvalidArgument(f"reference {text[:120]!r}: port {port[:10]!r} is not 1-65535")
    if not name or len(name) > 253 or not all(_HOST_LABEL.fullmatch(l) for l in name.split(".")):
        raise InvalidArgument(f"reference {text[:120]!r}: registry host {name[:80]!r} is malformed")


def parse_reference(text: object) -> Reference:
    """Parse and validate a reference (see the module docstring), or raise InvalidArgument."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("backup reference is empty")
    if len(text) > 4096 or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise InvalidArgument(f"backup reference {text[:120]!r} contains whitespace or control characters")
    if text.startswith(REGISTRY_SCHEME):
        body = text[len(REGISTRY_SCHEME):]
        host, slash, rest = body.partition("/")
        if not slash:
            raise InvalidArgument(f"reference {text[:120]!r} names no repository (oci://HOST/REPO:TAG@DIGEST)")
        _check_host(host, text)
        repository, tag, digest = _split_tag_digest(rest, text)
        if _REPOSITORY.fullmatch(repository) is None or len(repository) > _REPOSITORY_MAX:
            raise InvalidArgument(f"reference {text[:120]!r}: repository {repository[:80]!r} is malformed "
                                  "(lowercase path components separated by '/')")
        ref = Reference("registry", host, repository, tag, digest)
    elif text.startswith(LAYOUT_SCHEME):
        body = text[len(LAYOUT_SCHEME):]
        path, tag, digest = _split_tag_digest(body, text)
        if not path.startswith("/") or path == "/":
            raise InvalidArgument(f"reference {text[:120]!r}: an OCI layout is an absolute directory path")
        segments = path[1:].split("/")
        if any(s in ("", ".", "..") or _PATH_SEGMENT.fullmatch(s) is None for s in segments):
            raise InvalidArgument(f"reference {text[:120]!r}: layout path {path[:80]!r} has an empty, '.', '..' "
                                  "or unusual segment (allowed: [A-Za-z0-9._+-])")
        ref = Reference("layout", "", path, tag, digest)
    else:
        raise InvalidArgument(f"backup reference {text[:120]!r} must start with {REGISTRY_SCHEME} or {LAYOUT_SCHEME}")
    if ref.tag is None and ref.digest is None:
        raise InvalidArgument(f"reference {text[:120]!r} names neither a tag nor a digest")
    return ref
