"""The ``strata`` command: a thin dispatcher to subcommand modules.

Each subcommand lives in its own module exposing ``main(argv: list[str]) -> int``
and parses its own flags; this keeps start-up cheap (only the chosen module is imported).
"""

from __future__ import annotations

import importlib
import sys

from csi import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("csi.services.server", "run the CSI plugin on a unix socket"),
    "controller": ("csi.services.forwarder", "forward controller calls (expansion) to the node that owns a volume"),
    "demo": ("csi.demo", "end-to-end demo: create, write, snapshot, clone on a local socket"),
    "bench": ("csi.bench", "benchmarks: layered drivers and CSI lifecycle, with baselines"),
    "doctor": ("csi.ops.doctor", "what this kernel and root offer; which driver would start here"),
    "ls": ("csi.ops.ls", "volumes and snapshots on this node (from the records, read-only)"),
    "tree": ("csi.ops.tree", "layer chains drawn as a tree, hidden layers marked (read-only)"),
    "gc": ("csi.ops.gc", "layers and mounts no record knows: --dry-run reports, without it removes"),
    "backup": ("csi.ops.backup", "back up a snapshot to an OCI registry or layout (push), or restore one"),
}


def _usage() -> str:
    lines = ["usage: strata [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"strata {__version__}")
        return 0
    if args[0] not in SUBCOMMANDS:
        print(f"strata: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
