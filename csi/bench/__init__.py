"""``strata bench``: figures for the layered drivers and the CSI plugin, with baselines
measured in the same run, and the goals of issues 2 and 3 checked against them.

Usage::

    strata bench [--sizes 64M,256M,1G] [--drivers vfs,overlay,btrfs] [--parts drivers,csi]
                 [--quick] [--json FILE] [--scratch /var/tmp]

``--quick`` uses tiny sizes and few rounds (the smoke test's mode); explicit flags still
win over it. The benchmark makes its own backing filesystems (a directory on the root
filesystem, a btrfs loop file) under a fresh scratch directory and removes them, with
every mount and loop device, on exit, errors, Ctrl-C and SIGTERM.

Exit status: 0 when every case ran (goals may MISS: they are figures, not tests),
1 when a case failed, 2 on bad flags, 130 when interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi import __version__
from csi.bench import backup as backup_bench
from csi.bench import drivers as driver_bench
from csi.bench import lifecycle as csi_bench
from csi.bench import scale as scale_bench
from csi.bench.fsenv import BenchFilesystems, format_size, terminate_as_interrupt
from csi.errors import InvalidArgument
from csi.host.fsinfo import parse_size
from csi.bench.report import Section

DEFAULT_SIZES = "64M,256M,1G"
QUICK_SIZES = "1M,2M"
ALL_DRIVERS = ("vfs", "overlay", "btrfs")
PARTS = ("drivers", "csi", "scale", "backup")
DEFAULT_PARTS = ("drivers", "csi")


@dataclass(frozen=True)
class BenchOptions:
    sizes: tuple[int, ...]
    drivers: tuple[str, ...]
    parts: tuple[str, ...]
    quick: bool
    json_path: Path | None
    scratch: Path
    btrfs_bytes: int

    def driver_config(self) -> driver_bench.DriverBenchConfig:
        if self.quick:
            return driver_bench.DriverBenchConfig(self.sizes, latency_rounds=10, deep_depths=(("overlay", 12),),
                                                  deep_default=6, mount_rounds=3, diff_rounds=1)
        return driver_bench.DriverBenchConfig(self.sizes)

    def scale_config(self) -> scale_bench.ScaleConfig:
        if self.quick:
            return scale_bench.ScaleConfig(volumes=200, snapshots=50, probe=10, checkpoints=4, cycles=200)
        return scale_bench.ScaleConfig()

    def backup_config(self) -> backup_bench.BackupConfig:
        return backup_bench.BackupConfig(max(self.sizes))

    def csi_config(self) -> csi_bench.LifecycleConfig:
        if self.quick:
            return csi_bench.LifecycleConfig(self.sizes, rounds=5, concurrent_creates=16)
        return csi_bench.LifecycleConfig(self.sizes)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str]) -> BenchOptions:
    parser = argparse.ArgumentParser(prog="strata bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help=f"data sizes, comma separated (default {DEFAULT_SIZES}; {QUICK_SIZES} with --quick)")
    parser.add_argument("--drivers", default=",".join(ALL_DRIVERS), help="drivers to measure (default: all)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help="drivers, csi, scale, backup, comma separated (default drivers,csi; scale takes minutes per driver)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    parser.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    parser.add_argument("--scratch", type=Path, default=Path("/var/tmp"), metavar="DIR", help="where the scratch directory goes")
    parser.add_argument("--btrfs-bytes", default=None, metavar="SIZE", help="size of the sparse btrfs loop file (default: 8 x largest size, >= 4G)")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(sorted(set(parse_size(s) for s in _csv(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)))))
    except InvalidArgument as exc:
        parser.error(f"--sizes: {exc}")
    if not sizes:
        parser.error("--sizes: give at least one size")
    chosen = tuple(_csv(args.drivers))
    unknown = sorted(set(chosen) - set(ALL_DRIVERS))
    if unknown or not chosen:
        parser.error(f"--drivers: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_DRIVERS)}")
    parts = tuple(_csv(args.parts))
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    if not args.scratch.is_dir():
        parser.error(f"--scratch: {args.scratch} is not a directory")
    try:
        btrfs_bytes = parse_size(args.btrfs_bytes) if args.btrfs_bytes else max(4 << 30, 8 * max(sizes))
    except InvalidArgument as exc:
        parser.error(f"--btrfs-bytes: {exc}")
    return BenchOptions(sizes, chosen, parts, args.quick, args.json_path, args.scratch, btrfs_bytes)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _header(options: BenchOptions, fs: BenchFilesystems) -> str:
    backings = ", ".join(f"{name}: {b.path} ({b.name})" for name, b in fs.backings.items())
    return "\n".join([
        f"strata bench {__version__} - {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {platform.node()}, kernel {platform.release()}, {_cpus()} CPUs, python {platform.python_version()}, "
        f"load average {_load()} at start",
        f"sizes: {', '.join(format_size(s) for s in options.sizes)}; drivers: {', '.join(options.drivers)}"
        + ("; quick mode" if options.quick else ""),
        f"backing filesystems: {backings}",
    ])


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _load() -> str:
    """The 1/5/15-minute load averages: other work on the machine shows in the figures."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def run(options: BenchOptions) -> tuple[list[Section], str]:
    sections: list[Section] = []
    with terminate_as_interrupt(), BenchFilesystems(options.scratch, options.btrfs_bytes) as fs:
        header = _header(options, fs)
        print(header, flush=True)
        if "drivers" in options.parts:
            config = options.driver_config()
            results, skipped = driver_bench.run(fs.backings, fs.unavailable, config, options.drivers, _progress)
            sections.append(driver_bench.section(results, skipped, config))
            print("\n" + sections[-1].render(), flush=True)
        if "csi" in options.parts:
            config_csi = options.csi_config()
            results_csi, skipped_csi = csi_bench.run(fs.backings, fs.unavailable, config_csi, options.drivers, _progress)
            sections.append(csi_bench.section(results_csi, skipped_csi, config_csi))
            print("\n" + sections[-1].render(), flush=True)
        if "scale" in options.parts:
            config_scale = options.scale_config()
            results_scale, skipped_scale = scale_bench.run(fs.backings, fs.unavailable, config_scale, options.drivers,
                                                           _progress)
            sections.append(scale_bench.section(results_scale, skipped_scale, config_scale))
            print("\n" + sections[-1].render(), flush=True)
        if "backup" in options.parts:
            config_backup = options.backup_config()
            results_backup, skipped_backup = backup_bench.run(fs.backings, fs.unavailable, config_backup,
                                                              options.drivers, _progress)
            sections.append(backup_bench.section(results_backup, skipped_backup, config_backup))
            print("\n" + sections[-1].render(), flush=True)
    return sections, header


def main(argv: list[str] | None = None) -> int:
    options = parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()
    try:
        sections, header = run(options)
    except KeyboardInterrupt as exc:
        print(f"strata bench: interrupted ({exc or 'Ctrl-C'}); mounts, loop device and scratch removed",
              file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    failed = [case for s in sections for case, why in s.skipped if why.startswith("FAILED")]
    goals = [g for s in sections for g in s.goals]
    summary = (f"\nGoals: {sum(g.passed is True for g in goals)} PASS, {sum(g.passed is False for g in goals)} MISS, "
               f"{sum(g.passed is None for g in goals)} n/a; failed cases: {len(failed)}; took {elapsed:.0f} s; "
               f"load average {_load()} at end")
    print(summary)
    if options.json_path is not None:
        document: dict[str, Any] = {
            "header": header,
            "sizes": list(options.sizes),
            "quick": options.quick,
            "seconds": elapsed,
            "sections": [s.to_json() for s in sections],
        }
        options.json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 1 if failed else 0
