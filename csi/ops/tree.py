"""``strata tree``: the layer chains under a root drawn as a tree — each layer with its
kind, CSI name, size and state; hidden layers (deleted, kept for their children) and
unfinished ones (``creating``/``removing``) marked — read-only from the driver's layer
records (``read_layers``) and the CSI records. Works with or without the plugin running.

Usage::

    strata tree [--root DIR] [--driver NAME] [--json] [--log-format text|json]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from csi.errors import StrataError
from csi.ops.console import add_common_flags, add_driver_flag, emit_json, setup_logging
from csi.ops.inventory import Node, forest, gather
from csi.ops.ls import human


def label(node: Node) -> str:
    layer = node.layer
    parts = [layer.id, layer.kind.value]
    if node.name:
        parts.append(f'"{node.name}"')
    if layer.size_bytes is not None:
        parts.append(human(layer.size_bytes))
    if layer.block:
        parts.append("block")
    marks = []
    if layer.hidden:
        marks.append("HIDDEN: removal deferred until its children go")
    if layer.state.value != "ready":
        marks.append(layer.state.value.upper())
    if layer.mounts:
        marks.append(f"mounted x{layer.mounts}")
    return " ".join(parts) + (f"  [{'; '.join(marks)}]" if marks else "")


def draw(roots: list[Node]) -> list[str]:
    lines: list[str] = []

    def walk(node: Node, prefix: str, last: bool, top: bool) -> None:
        lines.append((prefix + ("└── " if last else "├── ") if not top else "") + label(node))
        inner = prefix + ("    " if last else "│   ") if not top else ""
        for i, child in enumerate(node.children):
            walk(child, inner, i == len(node.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return lines


def as_json(node: Node) -> dict[str, Any]:
    l = node.layer
    return {"id": l.id, "kind": l.kind.value, "state": l.state.value, "hidden": l.hidden, "name": node.name,
            "size_bytes": l.size_bytes, "mounts": l.mounts, "block": l.block,
            "children": [as_json(c) for c in node.children]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="strata tree", description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    add_driver_flag(parser, "the driver whose layers to read (default: the one holding state under the root)")
    parser.add_argument("--json", action="store_true", help="the trees as JSON on stdout")
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    try:
        inv = gather(args.root, args.driver, args.endpoint)
    except StrataError as exc:
        print(f"strata tree: {exc}", file=sys.stderr)
        return 1
    roots = forest(inv)
    if args.json:
        emit_json({"root": str(inv.root), "driver": inv.driver, "layers": [as_json(r) for r in roots]})
    elif roots:
        print(f"{inv.root} ({inv.driver}, {len(inv.layers)} layers)")
        print("\n".join(draw(roots)))
    else:
        print(f"no layers under {inv.root}")
    return 0
