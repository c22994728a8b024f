"""Benchmark: devicemapper thin snapshot and clone against copying the same data.

For each size (default 64 MiB, 256 MiB, 1 GiB) a writable layer is filled with that
much incompressible data, then timed:

* ``snapshot``: ``freeze`` of the (unmounted) layer — one ``create_snap`` pool message;
* ``clone``: ``create`` of a writable child of the snapshot, i.e. restore/clone;
* ``copy``: the baseline — a fresh layer, mounted, and the same file copied into it
  (``shutil.copyfile``, then ``fsync``), in the same pool and on the same machine.

Needs a kernel with device-mapper (run it in the qemu lane's guest:
``python -m tests.qemu.bench`` on the host boots one). The numbers under emulation are
slow in absolute terms; the ratio copy/clone is what carries over.

``main(argv)`` is the ``strata bench`` hook: ``--sizes 64M,256M,1G --home DIR --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from csi.graphdriver.driver import CreateOpts
from csi.graphdriver.devicemapper.driver import DevmapperDriver
from csi.host.fsinfo import parse_size

MIB = 1 << 20


@dataclass(frozen=True)
class DmBenchResult:
    size_bytes: int
    snapshot_s: float
    clone_s: float
    copy_s: float

    @property
    def copy_over_clone(self) -> float:
        return self.copy_s / max(self.snapshot_s + self.clone_s, 1e-9)


def _write_random(path: Path, size: int) -> None:
    chunk = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())


def bench_size(driver: DevmapperDriver, size: int, tag: str) -> DmBenchResult:
    layer_bytes = size + max(size // 4, 64 * MIB)  # room for the filesystem's own blocks
    src, snap, clone, copy = (f"{tag}-src", f"{tag}-snap", f"{tag}-clone", f"{tag}-copy")
    driver.create(src, opts=CreateOpts(size_bytes=layer_bytes))
    _write_random(driver.get(src) / "data", size)
    driver.put(src)

    t0 = time.perf_counter()
    driver.freeze(src, snap)
    t1 = time.perf_counter()
    driver.create(clone, snap)
    t2 = time.perf_counter()

    driver.create(copy, opts=CreateOpts(size_bytes=layer_bytes))
    source_path = driver.get(snap) / "data"
    t3 = time.perf_counter()
    target = driver.get(copy) / "data"
    shutil.copyfile(source_path, target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())
    t4 = time.perf_counter()
    for lid in (snap, copy):
        driver.put(lid)
    for lid in (clone, copy, src, snap):
        driver.remove(lid)
    return DmBenchResult(size, t1 - t0, t2 - t1, t4 - t3)


def run(home: Path, sizes: list[int], fs: str = "ext4") -> list[DmBenchResult]:
    data_bytes = max(4 << 30, 4 * max(sizes))
    driver = DevmapperDriver(home, {"dm.loopback": "true", "dm.loopdatasize": str(data_bytes),
                                    "dm.loopmetadatasize": "128M", "dm.fs": fs, "dm.basesize": "512M"})
    try:
        return [bench_size(driver, size, f"b{i}") for i, size in enumerate(sizes)]
    finally:
        driver.release_pool()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="strata bench devicemapper", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64M,256M,1G")
    parser.add_argument("--home", default=None, help="driver home (default: a temporary dir in /var/tmp)")
    parser.add_argument("--fs", default="ext4", choices=("ext4", "xfs"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="dm-bench-", dir="/var/tmp")) if args.home is None else None
    home = Path(args.home) if args.home else scratch / "devicemapper"  # type: ignore[operator]
    try:
        results = run(home, sizes, args.fs)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps([{**asdict(r), "copy_over_clone": round(r.copy_over_clone, 1)} for r in results]))
    else:
        print(f"{'size':>8} {'snapshot s':>11} {'clone s':>9} {'copy s':>8} {'copy/(snap+clone)':>18}")
        for r in results:
            print(f"{r.size_bytes // MIB:>7}M {r.snapshot_s:>11.3f} {r.clone_s:>9.3f} {r.copy_s:>8.3f} "
                  f"{r.copy_over_clone:>18.1f}")
    return 0
