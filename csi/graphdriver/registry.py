"""Per-node driver selection, as Docker's graphdriver ``New()``.

Order of decision:

1. An explicit name (``--driver NAME`` or ``STRATA_DRIVER``) wins; ``auto`` means none.
2. A driver that already holds state under the root (``<root>/<name>/layers.db`` with
   records, or a non-empty home) is reused; two with state is an error naming both.
3. Otherwise the priority list :data:`PRIORITY`, skipping drivers whose init raises
   NotSupported / PrerequisitesMissing / IncompatibleFilesystem (collected and reported
   if nothing fits) and stopping at any other error.

Why this priority: **btrfs** first — it only initialises when the root is on btrfs, and
then gives O(1) snapshots and qgroup size limits natively; **overlay** next, the kernel's
successor of aufs, O(1) freezes of unmounted layers; **aufs** for kernels that still
carry it; **devicemapper** only when a thin pool is configured (it never builds one
unasked); **vfs** last, it works everywhere but copies.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from csi.errors import DriverUnavailable, InvalidArgument, NoDriverAvailable, PrerequisitesMissing
from csi.graphdriver.layered import LayerDriver

log = logging.getLogger(__name__)

ENV_DRIVER = "STRATA_DRIVER"
PRIORITY: tuple[str, ...] = ("btrfs", "overlay", "aufs", "devicemapper", "vfs")

# name -> "module:Class"; imported lazily so a missing optional dependency only
# disables its own driver.
DRIVER_CLASSES: Mapping[str, str] = {
    "vfs": "csi.graphdriver.vfs:VfsDriver",
    "overlay": "csi.graphdriver.overlay.driver:OverlayDriver",
    "aufs": "csi.graphdriver.overlay.aufs:AufsDriver",
    "btrfs": "csi.graphdriver.btrfs.driver:BtrfsDriver",
    "devicemapper": "csi.graphdriver.devicemapper.driver:DevmapperDriver",
}


@dataclass(frozen=True)
class Selection:
    driver: LayerDriver
    reason: str  # "explicit", "prior state", "priority"
    skipped: tuple[tuple[str, str], ...] = ()


def driver_class(name: str) -> type[LayerDriver]:
    if name not in DRIVER_CLASSES:
        raise InvalidArgument(f"unknown driver {name!r}; known: {', '.join(sorted(DRIVER_CLASSES))}")
    module, _, cls = DRIVER_CLASSES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise PrerequisitesMissing(f"{name}: driver module unavailable: {exc}") from exc


def home_of(root: Path, name: str) -> Path:
    return Path(root) / name


def holds_state(root: Path, name: str, factory: Callable[[str], type[LayerDriver]] | None = None) -> bool:
    """Whether ``<root>/<name>`` holds that driver's layers (asked of the driver class)."""
    home = home_of(root, name)
    if not home.is_dir():
        return False
    return (factory or driver_class)(name).holds_state(home)


def new_driver(root: str | os.PathLike[str], name: str | None = None,
               options: Mapping[str, str] | None = None,
               factory: Callable[[str], type[LayerDriver]] = driver_class) -> Selection:
    """Pick and initialise the driver for ``root`` (see module docstring)."""
    root = Path(root)
    options = dict(options or {})
    name = name or os.environ.get(ENV_DRIVER) or "auto"
    if name != "auto":
        cls = factory(name)
        drv = cls(home_of(root, name), options)
        log.info("graphdriver %s chosen explicitly", name)
        return Selection(drv, "explicit")

    with_state = [n for n in PRIORITY if holds_state(root, n, factory)]
    if len(with_state) > 1:
        raise InvalidArgument(
            f"{root} contains state of several drivers ({', '.join(with_state)}); "
            "choose one with --driver / STRATA_DRIVER and remove the others' state"
        )
    if with_state:
        name = with_state[0]
        drv = factory(name)(home_of(root, name), options)
        log.info("graphdriver %s chosen: it holds prior state under %s", name, root)
        return Selection(drv, "prior state")

    skipped: list[tuple[str, str]] = []
    for candidate in PRIORITY:
        try:
            drv = factory(candidate)(home_of(root, candidate), options)
        except DriverUnavailable as exc:
            skipped.append((candidate, str(exc)))
            log.info("graphdriver %s skipped: %s", candidate, exc)
            continue
        log.info("graphdriver %s chosen by priority", candidate)
        return Selection(drv, "priority", tuple(skipped))
    raise NoDriverAvailable(
        "no layered driver can run here: " + "; ".join(f"{n}: {why}" for n, why in skipped)
    )
