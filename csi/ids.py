"""Identifier validation: the only gate between caller-supplied IDs and the filesystem.

A layer ID is 1 to 128 characters of ``[a-z0-9_-]`` starting with a letter or digit.
No dot, no slash, no NUL: a valid ID is always a single, harmless path component,
so code may join it onto a directory only *after* :func:`check_layer_id` accepted it.
"""

from __future__ import annotations

import re
import secrets

from csi.errors import InvalidArgument

LAYER_ID_MAX = 128
_LAYER_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,%d}" % (LAYER_ID_MAX - 1))


def is_layer_id(value: object) -> bool:
    """True when ``value`` is a well-formed layer ID."""
    return isinstance(value, str) and _LAYER_ID.fullmatch(value) is not None


def check_layer_id(value: object, what: str = "layer id") -> str:
    """Return ``value`` if it is a well-formed layer ID, else raise InvalidArgument."""
    if not is_layer_id(value):
        shown = repr(value)[:80]
        raise InvalidArgument(
            f"{what} {shown} is malformed: expected 1-{LAYER_ID_MAX} characters of "
            "[a-z0-9_-] starting with a letter or digit"
        )
    return value  # type: ignore[return-value]


def new_layer_id(prefix: str = "") -> str:
    """A fresh random layer ID (32 hex digits), optionally prefixed."""
    return check_layer_id(prefix + secrets.token_hex(16))
