"""Volume and snapshot IDs as CSI sees them: ``<layer-id>@<node-id>``.

* A volume's layer ID is ``vol-<32 hex>``, a snapshot's ``snap-<32 hex>``, a volume group
  snapshot's ``grp-<32 hex>``
  (:func:`csi.ids.new_layer_id`); the part after ``@`` is the node that owns the data,
  so a component elsewhere can route a call to it (:func:`owner_node`).
* A node ID is 1-90 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit,
  which keeps a whole ID within the 128 bytes CSI recommends.
* Anything else — foreign, malformed, path-like — was not issued by strata and is an
  unknown object: :func:`parse_id` raises :class:`csi.errors.NotFound` without touching
  anything. The layer part of a parsed ID is a valid layer ID (safe as a path component).
"""

from __future__ import annotations

import re

from csi.errors import InvalidArgument, NotFound

VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
CLONE_BASE_PREFIX = "base-"
GROUP_PREFIX = "grp-"  # a volume group snapshot's ID (not a layer: its members are snapshots)
NODE_ID_MAX = 90
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (NODE_ID_MAX - 1))
_ID = re.compile(r"(?P<layer>(?:vol|snap|grp)-[0-9a-f]{32})@(?P<node>[A-Za-z0-9][A-Za-z0-9._-]{0,%d})" % (NODE_ID_MAX - 1))


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if strata can embed it in IDs, else raise InvalidArgument."""
    if not isinstance(node_id, str) or _NODE_ID.fullmatch(node_id) is None:
        raise InvalidArgument(
            f"node id {node_id!r} is not usable: expected 1-{NODE_ID_MAX} characters of [A-Za-z0-9._-] "
            "starting with a letter or digit"
        )
    return node_id


def make_id(layer_id: str, node_id: str) -> str:
    """The CSI ID of ``layer_id`` owned by ``node_id``."""
    value = f"{layer_id}@{check_node_id(node_id)}"
    if _ID.fullmatch(value) is None:
        raise InvalidArgument(f"layer id {layer_id!r} is not a strata volume or snapshot layer id")
    return value


def parse_id(value: object) -> tuple[str, str]:
    """Split a strata-issued ID into ``(layer_id, node_id)``; NotFound for anything else."""
    match = _ID.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        shown = repr(value)[:80]
        raise NotFound(f"{shown} is not an ID strata issued (expected <vol|snap|grp>-<32 hex>@<node>)")
    return match["layer"], match["node"]


def owner_node(value: object) -> str:
    """The node that owns the volume or snapshot ``value`` (NotFound when malformed)."""
    return parse_id(value)[1]


def parse_local(value: object, node_id: str, prefix: str) -> str:
    """The layer ID of ``value`` if it is a ``prefix`` ID owned by ``node_id``, else NotFound."""
    layer_id, owner = parse_id(value)
    if owner != node_id or not layer_id.startswith(prefix):
        kind = {VOLUME_PREFIX: "volume", SNAPSHOT_PREFIX: "snapshot", GROUP_PREFIX: "group snapshot"}.get(prefix, "object")
        raise NotFound(f"{kind} {value} does not exist on node {node_id}")
    return layer_id
