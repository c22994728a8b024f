"""``strata ls``: the volumes and snapshots on this node — name, size, used, driver, parent
(content source), where each volume is staged and published — from the CSI records and the
driver's layer records, read-only (:mod:`csi.ops.inventory`). Works with or without the
plugin running; ``used`` needs a running plugin (NodeGetVolumeStats) and a staged volume.

Usage::

    strata ls [--root DIR] [--driver NAME] [--json] [--log-format text|json]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from csi.errors import StrataError
from csi.ops.console import Progress, add_common_flags, add_driver_flag, emit_json, setup_logging
from csi.ops.inventory import Entry, entries, gather


def human(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def table(rows: list[Entry]) -> str:
    head = ("KIND", "NAME", "STATE", "SIZE", "USED", "DRIVER", "PARENT", "STAGED / PUBLISHED")
    body = []
    for e in rows:
        where = ", ".join([*e.staged, *e.published]) or "-"
        state = e.state if e.state == e.layer_state == "ready" else f"{e.state} (layer {e.layer_state})"
        body.append((e.kind, e.name, state, human(e.size_bytes), human(e.used_bytes), e.driver or "-",
                     e.parent or "-", where))
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="strata ls", description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    add_driver_flag(parser, "the driver whose layers to read (default: the one holding state under the root)")
    parser.add_argument("--json", action="store_true", help="a JSON list on stdout")
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    try:
        inv = gather(args.root, args.driver, args.endpoint)
        with Progress("reading volume usage", len(inv.records.volumes)) as progress:
            rows = entries(inv)
            progress.step(len(inv.records.volumes))
    except StrataError as exc:
        print(f"strata ls: {exc}", file=sys.stderr)
        return 1
    if args.json:
        emit_json({"root": str(inv.root), "driver": inv.driver, "plugin_serving": inv.serving,
                   "items": [asdict(e) for e in rows]})
    elif rows:
        print(table(rows))
    else:
        print(f"no volumes or snapshots under {inv.root}")
    return 0
