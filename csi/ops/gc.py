"""``strata gc``: layers, mounts and half-done work no record accounts for, found by the
same reconcile code every start of the plugin runs (:meth:`Driver.reconcile`).

Usage::

    strata gc --dry-run [--root DIR] [--driver NAME] [--storage-opt K=V ...] [--json]
    strata gc           [--root DIR] [--driver NAME] [--storage-opt K=V ...] [--json]
    strata gc --imported [--dry-run] ...

* ``--dry-run`` opens the driver with ``recover=False`` (no start-up sweep) and asks
  ``reconcile(dry_run=True)``: the answer lists what a start would do — interrupted creates
  and freezes, unfinished removals, orphan layers on disk, hidden layers whose children are
  gone, mounts to restore or release — and no layer, record or mount changes. Safe while
  the plugin serves (work in flight at that moment may show up as orphans).
* Without ``--dry-run`` it refuses while a plugin answers on ``<root>/csi.sock`` (two
  sweeps over one store would fight); otherwise it opens the driver normally, which runs
  the sweep, and prints what it did (the driver's ``recovered`` Reconciliation).

* ``--imported`` also collects the node's cache of imported layers: ``oci-<ChainID>`` layers
  that restores pulled (from a backup or another node) and that no layer stands on any more
  (the volumes restored on them are gone), top first, so a whole unused chain goes. Only what
  the cache would give a later restore is lost: that restore pulls the layers again.

Quota project IDs (XFS prjquota) are reconciled by the sweep of vfs/overlay too; the
Reconciliation does not list them. CSI-level recovery (publications, pending records) is
``strata serve``'s start-up, not gc's. Exit status: 0 when the store was (or would be)
clean or was cleaned, 3 when a dry run found work, 1 on an error, 2 when refused.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from csi.backup.index import IMPORTED_PREFIX
from csi.errors import StrataError
from csi.graphdriver.driver import Driver, Reconciliation
from csi.graphdriver.registry import driver_class, home_of
from csi.ops.console import (Progress, add_common_flags, add_driver_flag, add_storage_opt_flag, emit_json,
                             setup_logging, storage_opts)
from csi.ops.records import drivers_with_state, plugin_serving, socket_of

FOUND = 3
_TITLES = {  # field -> (what it is, what the sweep does with it)
    "interrupted": ("creates/freezes a crash cut short", "rolled back or finished"),
    "removals": ("removals a crash cut short", "finished"),
    "orphans": ("layers on disk no record knows", "deleted"),
    "hidden_freed": ("hidden layers whose last child is gone", "freed"),
    "remounted": ("layers with references but no mount", "mounted again"),
    "released": ("mounts nobody holds", "released"),
}


def render(rec: Reconciliation, driver: str) -> str:
    verb = "would be" if rec.dry_run else "were"
    if rec.clean:
        return f"{driver}: nothing to collect" + (" (dry run)" if rec.dry_run else "")
    lines = [f"{driver}: {'dry run, nothing changed' if rec.dry_run else 'swept'}"]
    for key, (what, done) in _TITLES.items():
        ids = getattr(rec, key)
        if ids:
            lines.append(f"  {len(ids)} {what} — {verb} {done}:")
            lines += [f"    {i}" for i in ids]
    return "\n".join(lines)


def run(root: Any, name: str, options: dict[str, str], dry_run: bool) -> Reconciliation:
    cls = driver_class(name)
    with Progress(f"{'checking' if dry_run else 'sweeping'} {name} layers"):
        if dry_run:
            driver = cls(home_of(root, name), options, recover=False)
            return driver.reconcile(dry_run=True)
        driver = cls(home_of(root, name), options)
        assert driver.recovered is not None
        return driver.recovered


def unused_imported(driver: Driver) -> list[str]:
    """Imported layers no other layer stands on, collected top first until none is left
    (removing a chain's top frees the layer below it)."""
    layers = {layer.id: layer for layer in driver.layers()}
    unused: list[str] = []
    while True:
        parents = {layer.parent for layer in layers.values()}
        free = sorted(i for i in layers if i.startswith(IMPORTED_PREFIX) and i not in parents)
        if not free:
            return unused
        for layer_id in free:
            unused.append(layer_id)
            del layers[layer_id]


def collect_imported(root: Any, name: str, options: dict[str, str], dry_run: bool) -> list[str]:
    """The unused imported layers (removed unless ``dry_run``)."""
    cls = driver_class(name)
    driver = cls(home_of(root, name), options, recover=not dry_run)
    unused = unused_imported(driver)
    if not dry_run:
        for layer_id in unused:
            driver.remove(layer_id)
    return unused


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="strata gc", description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="only report what would be collected")
    add_driver_flag(parser, "the driver to sweep (default: the one holding state under the root)")
    add_storage_opt_flag(parser)
    parser.add_argument("--imported", action="store_true",
                        help="also remove imported layers (oci-…) that no volume stands on any more")
    parser.add_argument("--json", action="store_true", help="the Reconciliation as JSON on stdout")
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    root = args.root.absolute()
    options = storage_opts(parser, args.storage_opt)
    sock = socket_of(root, args.endpoint)
    serving = plugin_serving(sock)
    if serving and not args.dry_run:
        print(f"strata gc: a plugin is serving on {sock}; its start-up already sweeps. "
              "Stop it first, or use --dry-run", file=sys.stderr)
        return 2
    name = args.driver
    if name is None:
        held = drivers_with_state(root)
        if not held:
            print(f"strata gc: no driver holds state under {root}: nothing to collect")
            return 0
        if len(held) > 1:
            print(f"strata gc: {root} holds state of several drivers ({', '.join(held)}); choose one with --driver",
                  file=sys.stderr)
            return 1
        name = held[0]
    imported: list[str] = []
    try:
        rec = run(root, name, options, args.dry_run)
        if args.imported:
            imported = collect_imported(root, name, options, args.dry_run)
    except StrataError as exc:
        print(f"strata gc: {exc}", file=sys.stderr)
        return 1
    if args.json:
        emit_json({"root": str(root), "driver": name, "plugin_serving": serving, "clean": rec.clean and not imported,
                   **asdict(rec), "imported_unused": imported})
    else:
        print(render(rec, name))
        if args.imported:
            verb = "would be" if args.dry_run else "were"
            print(f"  {len(imported)} imported layers no volume stands on — {verb} removed"
                  + "".join(f"\n    {i}" for i in imported) if imported else f"{name}: no unused imported layers")
    return FOUND if args.dry_run and not (rec.clean and not imported) else 0
