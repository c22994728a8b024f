"""A node's volumes, snapshots and layers, from the CSI records and the driver's layer
records, read-only (:mod:`csi.ops.records`): what ``strata ls`` and ``strata tree`` show.

* :func:`gather` — one consistent-enough look at a root: the driver holding state (or the
  one named), every layer record (hidden and unfinished included), the CSI records, and
  whether a plugin is serving on the root's socket.
* :func:`entries` — one :class:`Entry` per volume and snapshot: name, size, used, driver,
  parent (the content source: a volume's snapshot or source volume, a snapshot's volume, by CSI name),
  where it is staged and published.
* :func:`forest` — the layer chains as trees (:class:`Node`), roots first.

``used`` is the figure NodeGetVolumeStats gives (which kubelet exports per PVC): asked of
the running plugin for staged filesystem volumes (a read-only call over the socket);
without a plugin, or for an unstaged volume, it is unknown (``None``): working it out would
mean opening the driver, which writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi.errors import InvalidArgument, StrataError
from csi.graphdriver.driver import Layer
from csi.ops.records import driver_layers, drivers_with_state, plugin_serving, socket_of
from csi.state.readonly import Records, read_records
from csi.state.store import PUBLISH, STAGE
from csi.proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger("strata.ops")


@dataclass(frozen=True)
class Inventory:
    root: Path
    driver: str | None
    layers: tuple[Layer, ...]
    records: Records
    serving: bool
    socket: Path


@dataclass(frozen=True)
class Entry:
    kind: str  # "volume" or "snapshot"
    name: str
    layer: str
    state: str
    size_bytes: int
    used_bytes: int | None
    driver: str | None
    parent: str | None
    staged: tuple[str, ...] = ()
    published: tuple[str, ...] = ()
    access: str = "filesystem"
    layer_state: str = "missing"  # the layer record's state, "missing" when the driver has none


@dataclass
class Node:
    layer: Layer
    name: str | None  # the CSI name of the volume or snapshot this layer is
    children: list[Node] = field(default_factory=list)


def gather(root: str | Path, driver: str | None = None, endpoint: str = "") -> Inventory:
    root = Path(root).absolute()
    if driver is None:
        held = drivers_with_state(root)
        if len(held) > 1:
            raise InvalidArgument(f"{root} holds state of several drivers ({', '.join(held)}); name one with --driver")
        driver = held[0] if held else None
    layers = tuple(driver_layers(root, driver)) if driver else ()
    sock = socket_of(root, endpoint)
    return Inventory(root, driver, layers, read_records(root), plugin_serving(sock), sock)


def _names(inv: Inventory) -> dict[str, str]:
    names = {s.layer: s.name for s in inv.records.snapshots}
    names.update({v.layer: v.name for v in inv.records.volumes})
    return names


def _usage_from_plugin(inv: Inventory, layer: str, path: str) -> int | None:
    """NodeGetVolumeStats of a staged volume, asked of the serving plugin; None if it cannot say."""
    try:
        with grpc.insecure_channel(f"unix://{inv.socket}") as channel:
            node = csi_pb2_grpc.NodeStub(channel)
            node_id = node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5).node_id
            stats = node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=f"{layer}@{node_id}", volume_path=path), timeout=10)
    except Exception as exc:  # noqa: BLE001 - a figure we cannot get is shown as unknown
        log.info("no usage for %s from the plugin: %s", layer, exc)
        return None
    for usage in stats.usage:
        if usage.unit == usage.BYTES:
            return int(usage.used)
    return None


def entries(inv: Inventory, usage: bool = True) -> list[Entry]:
    names = _names(inv)
    by_id = {l.id: l for l in inv.layers}
    pubs = inv.records.publications
    out: list[Entry] = []

    for v in sorted(inv.records.volumes, key=lambda v: v.name):
        staged = tuple(p.path for p in pubs if p.layer == v.layer and p.kind == STAGE)
        published = tuple(p.path for p in pubs if p.layer == v.layer and p.kind == PUBLISH)
        used = None
        if usage and inv.serving and staged and not v.block:
            used = _usage_from_plugin(inv, v.layer, staged[0])
        layer = by_id.get(v.layer)
        # the CSI content source (the layer's own parent may be a snapshot of itself: overlay's O(1) freeze
        # rebases the volume on it; `strata tree` shows the layers as they are)
        source = v.source_id.partition("@")[0]
        parent = names.get(source, v.source_id) if v.source_kind else None
        out.append(Entry("volume", v.name, v.layer, v.state.value, v.capacity, used, inv.driver, parent,
                         staged, published, "block" if v.block else "filesystem",
                         layer.state.value if layer else "missing"))
    for s in sorted(inv.records.snapshots, key=lambda s: s.name):
        layer = by_id.get(s.layer)
        source = names.get(s.source_layer, s.source_layer)
        out.append(Entry("snapshot", s.name, s.layer, s.state.value, s.size, None, inv.driver, source,
                         layer_state=layer.state.value if layer else "missing"))
    return out


def forest(inv: Inventory) -> list[Node]:
    names = _names(inv)
    nodes = {l.id: Node(l, names.get(l.id)) for l in inv.layers}
    roots: list[Node] = []
    for node in nodes.values():
        parent = nodes.get(node.layer.parent) if node.layer.parent else None
        (parent.children if parent is not None else roots).append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: (n.layer.created, n.layer.id))
    roots.sort(key=lambda n: (n.layer.created, n.layer.id))
    return roots


def describe_error(exc: StrataError) -> str:
    return f"strata: {exc}"
