"""``strata doctor``: what this kernel and this root offer, which drivers would start here
and why the others would not, and the driver ``--driver auto`` would choose.

Usage::

    strata doctor [--root DIR] [--driver auto|NAME] [--storage-opt KEY=VALUE ...] [--json]

Exit status (for scripts): 0 when some driver can run on this root, 1 when none can (or
the root holds the state of several drivers, which ``strata serve`` refuses).

How: each driver class's own ``check_support`` says whether it can run and why not; the
choice is :func:`csi.graphdriver.registry.new_driver` itself (explicit name or
``STRATA_DRIVER``, prior state, priority list), given a factory whose "drivers" only run
``check_support`` — so doctor and ``strata serve`` cannot disagree, and no driver is built.
The checks write nothing under the root; two of them probe the filesystem holding it in a
temporary directory they remove again: overlay's ``check_support`` mounts a tiny overlay,
and the reflink check clones one small file (FICLONE).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from csi.errors import DriverUnavailable, StrataError
from csi.graphdriver.btrfs import ioctl as ioc
from csi.graphdriver.devicemapper import ioctl as dm
from csi.graphdriver.registry import PRIORITY, driver_class, holds_state, home_of, new_driver
from csi.host.fsinfo import existing_ancestor, kernel_has, mount_of
from csi.host.treecopy import FICLONE
from csi.ops.console import (add_common_flags, add_driver_flag, add_storage_opt_flag, emit_json, setup_logging,
                             storage_opts)

log = logging.getLogger("strata.doctor")


@dataclass(frozen=True)
class Feature:
    name: str
    available: bool
    detail: str


@dataclass(frozen=True)
class DriverCheck:
    name: str
    can_run: bool
    reason: str  # why not (the driver's own words), or what it offers
    holds_state: bool


@dataclass(frozen=True)
class Report:
    kernel: str
    root: str
    filesystem: str
    mount_options: tuple[str, ...]
    features: tuple[Feature, ...]
    drivers: tuple[DriverCheck, ...]
    choice: str | None  # the driver `auto` (or the explicit one) would start
    choice_reason: str  # "explicit", "prior state", "priority", or why none

    @property
    def ok(self) -> bool:
        return self.choice is not None


# ---------------------------------------------------------------------------- kernel and root


def _reflinks(base: Path) -> Feature:
    try:
        with tempfile.TemporaryDirectory(prefix=".strata-doctor-", dir=base) as tmp:
            src, dst = Path(tmp) / "a", Path(tmp) / "b"
            src.write_bytes(b"x" * 4096)
            with open(src, "rb") as s, open(dst, "wb") as d:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
    except OSError as exc:
        return Feature("reflinks", False, f"FICLONE on {base} failed: {exc.strerror or exc} (vfs copies in full)")
    return Feature("reflinks", True, f"FICLONE works on {base} (vfs shares extents)")


def _btrfs_quota(base: Path, fstype: str) -> Feature:
    if fstype != "btrfs":
        return Feature("btrfs qgroups", False, f"the root is on {fstype}, not btrfs")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        status = ioc.quota_status(fd)
    except OSError as exc:
        return Feature("btrfs qgroups", False, f"cannot read the quota status: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if status is None:
        return Feature("btrfs qgroups", True, "quota off now; the btrfs driver enables it at start-up")
    return Feature("btrfs qgroups", True, "quota on" + (", rescan in progress" if status.rescanning else ""))


def _project_quota(fstype: str, options: tuple[str, ...]) -> Feature:
    opts = set(options)
    if fstype == "xfs":
        on = bool(opts & {"prjquota", "pquota", "pqnoenforce"})
        return Feature("project quota", on, "XFS mounted with prjquota: vfs/overlay limit volume sizes" if on
                       else "XFS without the prjquota mount option: no size limits on vfs/overlay")
    if fstype == "ext4":
        on = "prjquota" in opts
        return Feature("project quota", on, "ext4 mounted with prjquota" + ("" if on else
                       " missing: no size limits on vfs/overlay (strata enforces XFS project quota only)"))
    return Feature("project quota", False, f"{fstype}: no project quota (only XFS prjquota is used)")


def _device_mapper() -> Feature:
    try:
        dm.probe()
    except (StrataError, OSError) as exc:
        return Feature("device-mapper thin", False, str(exc))
    return Feature("device-mapper thin", True, "thin-pool and thin targets loaded (devicemapper needs a pool: "
                   "--storage-opt dm.thinpooldev=/dev/mapper/POOL)")


def features(root: Path) -> tuple[str, tuple[str, ...], tuple[Feature, ...]]:
    base = existing_ancestor(root)
    mp = mount_of(base)
    fstype = mp.fstype if mp else "unknown"
    options = tuple(mp.options + mp.super_options) if mp else ()
    overlay_max = getattr(driver_class("overlay"), "max_chain", None)
    found = [
        Feature("overlay", kernel_has("overlay"),
                f"in /proc/filesystems; a chain stacks up to {overlay_max} layers (the kernel's lower limit)"
                if kernel_has("overlay") else "not in /proc/filesystems"),
        Feature("btrfs", kernel_has("btrfs"), "in /proc/filesystems" if kernel_has("btrfs")
                else "not in /proc/filesystems"),
        _btrfs_quota(base, fstype),
        _device_mapper(),
        _project_quota(fstype, options),
        Feature("aufs", kernel_has("aufs"), "in /proc/filesystems" if kernel_has("aufs")
                else "not in /proc/filesystems (this kernel does not carry aufs)"),
        _reflinks(base),
    ]
    return fstype, options, tuple(found)


# ---------------------------------------------------------------------------- drivers


def check_driver(root: Path, name: str, options: Mapping[str, str]) -> DriverCheck:
    try:
        state = holds_state(root, name)
    except StrataError:
        state = False
    try:
        driver_class(name).check_support(home_of(root, name), options)
    except DriverUnavailable as exc:
        return DriverCheck(name, False, str(exc), state)
    except StrataError as exc:  # a bad option: the driver would refuse to start
        return DriverCheck(name, False, f"{type(exc).__name__}: {exc}", state)
    return DriverCheck(name, True, "supported here", state)


def _checking_factory(name: str) -> type:
    """A stand-in "driver" for :func:`new_driver`: construction runs only ``check_support``."""
    real = driver_class(name)

    class Checked:
        holds_state = real.holds_state

        def __init__(self, home: Path, options: Mapping[str, str]) -> None:
            real.check_support(Path(home), dict(options))
            self.name = name

    return Checked


def choose(root: Path, name: str | None, options: Mapping[str, str]) -> tuple[str | None, str]:
    try:
        selection = new_driver(root, name, options, factory=_checking_factory)
    except StrataError as exc:
        return None, str(exc)
    return selection.driver.name, selection.reason


def diagnose(root: Path, name: str | None = None, options: Mapping[str, str] | None = None) -> Report:
    root = Path(root).absolute()
    options = dict(options or {})
    fstype, mount_options, found = features(root)
    checks = tuple(check_driver(root, n, options) for n in PRIORITY)
    choice, reason = choose(root, None if name in (None, "auto") else name, options)
    return Report(platform.release(), str(root), fstype, mount_options, found, checks, choice, reason)


def render(report: Report) -> str:
    yes = {True: "yes", False: "no "}
    lines = [f"kernel     {report.kernel}", f"root       {report.root} (on {report.filesystem})", "",
             "kernel and filesystem:"]
    lines += [f"  {yes[f.available]}  {f.name:<20} {f.detail}" for f in report.features]
    lines += ["", "drivers (priority order):"]
    for c in report.drivers:
        state = "  [holds state]" if c.holds_state else ""
        lines.append(f"  {'ok ' if c.can_run else 'no '} {c.name:<13} {c.reason}{state}")
    lines.append("")
    if report.ok:
        lines.append(f"driver auto would choose: {report.choice} ({report.choice_reason})")
    else:
        lines.append(f"no driver can start here: {report.choice_reason}")
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    out = asdict(report)
    out["ok"] = report.ok
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="strata doctor", description=__doc__.split("\n\n")[0])
    add_common_flags(parser)
    add_driver_flag(parser, "check this driver as `strata serve --driver` would (default: auto)", "auto")
    add_storage_opt_flag(parser)
    parser.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    report = diagnose(args.root, args.driver, storage_opts(parser, args.storage_opt))
    if args.json:
        emit_json(to_json(report))
    else:
        print(render(report))
    return 0 if report.ok else 1
