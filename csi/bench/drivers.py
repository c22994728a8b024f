"""The layered-storage benchmark: every driver on every backing filesystem it runs on.

Cases (``CASES``): vfs on ext4, vfs on btrfs (reflinks), overlay on ext4, overlay on
btrfs, btrfs on btrfs. Each case gets a fresh driver home on its backing filesystem,
made by :mod:`csi.bench.fsenv`. For each size in ``--sizes`` (data = a tree of 4 MiB
files of incompressible bytes, written through ``get`` and fsynced *before* any timing):

* **copy baseline** — ``cp -a --reflink=never`` of the same tree on the same filesystem;
* **freeze, mounted** — ``freeze`` of a writable layer holding the data while it is
  mounted (``get`` held); **freeze, unmounted** — the same for a second layer after ``put``;
* **clone** — what CSI does for a clone: that freeze plus ``create`` of a writable child;
* **small change** (largest size) — mount a layer frozen before, write 1 MiB, ``freeze``
  it again; once for the layer last frozen unmounted (the goal's case: overlay holds
  the data in the layer below by then) and once for the one last frozen while mounted.

Then, once per case: ``get``/``put`` latency p50/p99 on the top of a 10-layer chain;
mount (first ``get``) time of the deepest chain the tests use (overlay 500 layers,
others 128); ``diff`` throughput of a frozen layer (largest size up to 256 MiB) next
to ``tar -c`` of the same tree (both read to the end by this process, page cache warm).

What is measured: wall-clock time of the call, one sample per operation and size, page
cache warm. Caches are not dropped: ``drop_caches`` is machine-wide (it would disturb
whatever else runs) and a node sees warm caches right after data was written. ``os.sync()`` runs *between*
timed steps (untimed), so one step's writeback does not land in the next one's time.
Every layer made is removed at the end of its step; driver homes and the btrfs loop
filesystem are torn down even on errors and Ctrl-C.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from csi.host import mount as mnt
from csi.bench.fsenv import MIB, Backing, DataSource, copy_tree, fill_tree, format_size, remove_tree, write_file
from csi.bench.report import (
    Goal, Latency, Section, Table, at_least, at_most, mbps, ms, timed, with_ratio,
)
from csi.errors import DriverUnavailable, StrataError
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.registry import driver_class
from csi.ids import new_layer_id

GOAL_FREEZE_S = 0.050
GOAL_GET_PUT_P50_S = 0.005
GOAL_DIFF_VS_TAR = 0.80
READ_BYTES = MIB


@dataclass(frozen=True)
class DriverCase:
    driver: str
    backing: str

    @property
    def label(self) -> str:
        return f"{self.driver} on {self.backing}"


CASES: tuple[DriverCase, ...] = (
    DriverCase("vfs", "ext4"),
    DriverCase("vfs", "btrfs"),
    DriverCase("overlay", "ext4"),
    DriverCase("overlay", "btrfs"),
    DriverCase("btrfs", "btrfs"),
)


@dataclass(frozen=True)
class DriverBenchConfig:
    sizes: tuple[int, ...]
    latency_rounds: int = 200
    latency_depth: int = 10
    deep_depths: tuple[tuple[str, int], ...] = (("overlay", 500),)
    deep_default: int = 128
    mount_rounds: int = 10
    markers: int = 20  # levels of a chain that add a file (see build_chain)
    change_bytes: int = MIB
    diff_rounds: int = 2

    def deep_depth(self, driver: str) -> int:
        return dict(self.deep_depths).get(driver, self.deep_default)

    @property
    def goal_size(self) -> int:
        """The size the 1 GiB goals are checked at: 1 GiB if measured, else the largest."""
        return (1 << 30) if (1 << 30) in self.sizes else max(self.sizes)

    @property
    def diff_size(self) -> int:
        """Throughput needs no 1 GiB: the largest size up to 256 MiB (else the smallest)."""
        fitting = [s for s in self.sizes if s <= 256 * MIB]
        return max(fitting) if fitting else min(self.sizes)


@dataclass(frozen=True)
class SizeFigures:
    size: int
    copy_s: float
    freeze_mounted_s: float
    freeze_unmounted_s: float
    child_mounted_s: float  # create of a writable child of the frozen layer
    child_unmounted_s: float
    # freeze of the mounted layer after a 1 MiB write (largest size only): the layer was
    # last frozen unmounted (overlay then holds the data below it) / while mounted
    change_freeze_s: float | None
    change_after_mounted_freeze_s: float | None

    @property
    def clone_mounted_s(self) -> float:
        return self.freeze_mounted_s + self.child_mounted_s

    @property
    def clone_unmounted_s(self) -> float:
        return self.freeze_unmounted_s + self.child_unmounted_s


@dataclass(frozen=True)
class DiffFigures:
    size: int
    diff_bytes: int
    diff_s: float
    tar_bytes: int
    tar_s: float

    @property
    def diff_rate(self) -> float:
        return self.diff_bytes / self.diff_s

    @property
    def tar_rate(self) -> float:
        return self.tar_bytes / self.tar_s


@dataclass(frozen=True)
class ChainFigures:
    depth: int
    build_s: float
    get: Latency
    put: Latency


@dataclass(frozen=True)
class CaseResult:
    case: DriverCase
    sizes: tuple[SizeFigures, ...] = ()
    diff: DiffFigures | None = None
    get_put: ChainFigures | None = None
    deep: ChainFigures | None = None
    error: str | None = None
    size_enforcement: str = ""


class BenchError(StrataError):
    """A benchmark step saw something wrong (the figure would be meaningless)."""


class Ledger:
    """The layers one step made, removed again (children first) by :meth:`release`."""

    def __init__(self, driver: LayerDriver) -> None:
        self.driver = driver
        self.ids: list[str] = []
        self.held: list[str] = []  # one entry per outstanding get

    def new_id(self, role: str) -> str:
        layer_id = new_layer_id(f"{role}-")
        self.ids.append(layer_id)
        return layer_id

    def get(self, layer_id: str) -> Path:
        path = self.driver.get(layer_id)
        self.held.append(layer_id)
        return path

    def put(self, layer_id: str) -> None:
        self.held.remove(layer_id)
        self.driver.put(layer_id)

    def release(self) -> None:
        """Put what is held, then remove the layers, deepest first: a parent is only
        removed once its children are gone, so no deferred-removal cascade is needed."""
        while self.held:
            self.driver.put(self.held.pop())
        parents = {layer.id: layer.parent for layer in self.driver.layers()}
        depth: dict[str, int] = {}

        def depth_of(layer_id: str) -> int:
            path = []
            current: str | None = layer_id
            while current is not None and current not in depth:
                path.append(current)
                current = parents.get(current)
            base = depth.get(current, 0) if current is not None else 0
            for offset, item in enumerate(reversed(path), start=1):
                depth[item] = base + offset
            return depth[layer_id]

        mine = [layer_id for layer_id in self.ids if layer_id in parents]
        for layer_id in sorted(mine, key=depth_of, reverse=True):
            self.driver.remove(layer_id)
        self.ids.clear()


@contextmanager
def ledger(driver: LayerDriver) -> Iterator[Ledger]:
    """Yield a :class:`Ledger`; release its layers afterwards. When the body failed (or
    was interrupted) a failing release must not replace that exception: it is noted on it."""
    book = Ledger(driver)
    try:
        yield book
    except BaseException as exc:
        try:
            book.release()
        except Exception as cleanup_error:  # the body's exception is the one to report
            exc.add_note(f"also failed while removing the step's layers: {cleanup_error!r}")
        raise
    book.release()
    os.sync()


def open_driver(case: DriverCase, backing: Backing) -> LayerDriver:
    home = backing.fresh_dir(case.driver) / case.driver
    return driver_class(case.driver)(home, {})


def close_driver(driver: LayerDriver) -> None:
    try:
        driver.cleanup()
    finally:
        for mp in mnt.mounts_under(driver.home):
            mnt.unmount(mp.target, detach=True)
        remove_tree(driver.home.parent)


def _settle() -> None:
    os.sync()


def measure_size(driver: LayerDriver, backing: Backing, size: int, data: DataSource,
                 config: DriverBenchConfig, with_change: bool) -> SizeFigures:
    """Freeze / clone of layers holding ``size`` bytes, mounted and not, next to a copy."""
    with ledger(driver) as book:

        def freeze_and_clone(prefix: str, keep_mounted: bool) -> tuple[float | None, float, float, float | None]:
            """Fill a layer (and, mounted, time a copy of its tree: the baseline), freeze it
            (left mounted or not), clone the frozen layer, and with ``with_change`` freeze again
            after a small write. Returns (copy, freeze, clone, freeze after change) seconds."""
            source = book.new_id(f"w{prefix}")
            driver.create(source)
            tree = book.get(source)
            fill_tree(tree, size, data)
            copy_s = None
            if keep_mounted:
                _settle()
                copy_dir = backing.fresh_dir("copy")
                copy_s, _ = timed(lambda: copy_tree(tree, copy_dir / "tree"))
                remove_tree(copy_dir)
            else:
                book.put(source)
            _settle()
            frozen = book.new_id(f"f{prefix}")
            freeze_s, _ = timed(lambda: driver.freeze(source, frozen))
            _settle()
            child_s, _ = timed(lambda: driver.create(book.new_id(f"c{prefix}"), frozen))
            _settle()
            change_s = None
            if with_change:
                write_file(book.get(source) / "small-change", config.change_bytes, data)
                _settle()
                change_s, _ = timed(lambda: driver.freeze(source, book.new_id("fc")))
                _settle()
            return copy_s, freeze_s, child_s, change_s

        copy_s, freeze_m, child_m, change_m = freeze_and_clone("m", keep_mounted=True)
        _, freeze_u, child_u, change_u = freeze_and_clone("u", keep_mounted=False)
        assert copy_s is not None
    return SizeFigures(size, copy_s, freeze_m, freeze_u, child_m, child_u, change_u, change_m)


def _drain(stream: IO[bytes]) -> int:
    total = 0
    while chunk := stream.read(READ_BYTES):
        total += len(chunk)
    return total


def _tar_bytes(tree: Path) -> int:
    proc = subprocess.Popen(["tar", "-c", "-f", "-", "-C", str(tree), "."], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        total = _drain(proc.stdout)
    finally:
        proc.stdout.close()
        code = proc.wait()
    if code != 0:
        raise BenchError(f"tar -c of {tree} exited with {code}")
    return total


def _diff_bytes(driver: LayerDriver, layer_id: str) -> int:
    stream = driver.diff(layer_id, None)
    try:
        return _drain(stream)
    finally:
        stream.close()


def measure_diff(driver: LayerDriver, size: int, data: DataSource, config: DriverBenchConfig) -> DiffFigures:
    """``diff`` of a frozen layer holding ``size`` bytes vs ``tar -c`` of its tree (best of N)."""
    with ledger(driver) as book:
        source = book.new_id("wd")
        driver.create(source)
        fill_tree(book.get(source), size, data)
        book.put(source)
        frozen = book.new_id("fd")
        driver.freeze(source, frozen)
        _settle()
        tree = book.get(frozen)
        tar_runs = []
        diff_runs = []
        for _ in range(config.diff_rounds):
            tar_runs.append(timed(lambda: _tar_bytes(tree)))
            diff_runs.append(timed(lambda: _diff_bytes(driver, frozen)))
        tar_s, tar_bytes = min(tar_runs)
        diff_s, diff_bytes = min(diff_runs)
        if diff_bytes < size or tar_bytes < size:
            raise BenchError(f"diff ({diff_bytes} B) or tar ({tar_bytes} B) shorter than the data ({size} B)")
    return DiffFigures(size, diff_bytes, diff_s, tar_bytes, tar_s)


def build_chain(driver: LayerDriver, book: Ledger, depth: int, markers: int) -> str:
    """A chain of ``depth`` layers: ``depth - 1`` frozen ones and a writable top. About
    ``markers`` levels, spread evenly (the first and the last included), add a small file
    (written through ``get``); the top must see every one. Each level is one ``freeze``
    of the writable layer; a driver that does not rebase it onto the new frozen layer
    (overlay does) gets a fresh writable child of that layer. Returns the top's ID."""
    step = max(1, (depth - 1) // max(1, markers))
    marked = {level for level in range(depth - 1) if level % step == 0} | {depth - 2}
    writable = book.new_id("cw")
    driver.create(writable)
    for level in range(depth - 1):
        if level in marked:
            tree = book.get(writable)
            (tree / f"level-{level:04d}").write_bytes(level.to_bytes(4, "big") * 1024)
            book.put(writable)
        frozen = book.new_id("cf")
        driver.freeze(writable, frozen)
        if driver.layer(writable).parent != frozen:
            driver.remove(writable)
            writable = book.new_id("cw")
            driver.create(writable, frozen)
    chain = len(driver.chain(writable))
    seen = len([n for n in os.listdir(book.get(writable)) if n.startswith("level-")])
    book.put(writable)
    if chain != depth or seen != len(marked):
        raise BenchError(f"top of a {depth}-layer chain has {chain} layers and sees {seen} "
                         f"of the {len(marked)} files written below it")
    return writable


def measure_chain(driver: LayerDriver, depth: int, rounds: int, markers: int) -> ChainFigures:
    """get (mount) and put (unmount) latency of the top of a ``depth``-layer chain."""
    with ledger(driver) as book:
        build_s, top = timed(lambda: build_chain(driver, book, depth, markers))
        _settle()
        gets, puts = [], []
        for _ in range(rounds):
            gets.append(timed(lambda: driver.get(top))[0])
            puts.append(timed(lambda: driver.put(top))[0])
    return ChainFigures(depth, build_s, Latency.of(gets), Latency.of(puts))


def _enforcement(driver: LayerDriver) -> str:
    return dict(driver.status()).get("size enforcement", "")


def run_case(case: DriverCase, backing: Backing, config: DriverBenchConfig, data: DataSource,
             progress: Callable[[str], None]) -> CaseResult:
    """Every figure of one case. An error ends the case with what was measured so far and
    the error in ``CaseResult.error``; Ctrl-C / SIGTERM propagate."""
    driver = open_driver(case, backing)
    found: dict[str, Any] = {"sizes": []}
    try:
        found["size_enforcement"] = _enforcement(driver)
        largest = max(config.sizes)
        for size in config.sizes:
            progress(f"{case.label}: freeze/clone of {format_size(size)}")
            found["sizes"].append(measure_size(driver, backing, size, data, config, with_change=size == largest))
        progress(f"{case.label}: diff vs tar of {format_size(config.diff_size)}")
        found["diff"] = measure_diff(driver, config.diff_size, data, config)
        progress(f"{case.label}: get/put on a {config.latency_depth}-layer chain")
        found["get_put"] = measure_chain(driver, config.latency_depth, config.latency_rounds, config.markers)
        depth = config.deep_depth(case.driver)
        progress(f"{case.label}: mount of a {depth}-layer chain")
        found["deep"] = measure_chain(driver, depth, config.mount_rounds, config.markers)
    except (StrataError, OSError, subprocess.CalledProcessError) as exc:
        found["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        close_driver(driver)
    found["sizes"] = tuple(found["sizes"])
    return CaseResult(case, **found)


def run(backings: dict[str, Backing], unavailable: dict[str, str], config: DriverBenchConfig,
        drivers: tuple[str, ...], progress: Callable[[str], None]) -> tuple[list[CaseResult], list[tuple[str, str]]]:
    data = DataSource()
    results: list[CaseResult] = []
    skipped: list[tuple[str, str]] = []
    for case in CASES:
        if case.driver not in drivers:
            continue
        if case.backing not in backings:
            skipped.append((case.label, unavailable.get(case.backing, f"no {case.backing} filesystem")))
            continue
        try:
            results.append(run_case(case, backings[case.backing], config, data, progress))
        except DriverUnavailable as exc:
            skipped.append((case.label, str(exc)))
    return results, skipped


# ---------------------------------------------------------------------- report


def _by_size(result: CaseResult, size: int) -> SizeFigures | None:
    return next((s for s in result.sizes if s.size == size), None)


def goals(results: list[CaseResult], config: DriverBenchConfig) -> list[Goal]:
    found: list[Goal] = []
    gsize = format_size(config.goal_size)
    smallest = min(config.sizes)
    for r in results:
        label = r.case.label
        if r.case.driver == "btrfs":
            at = _by_size(r, config.goal_size)
            small = _by_size(r, smallest)
            for what, pick in (("freeze, mounted", lambda s: s.freeze_mounted_s),
                               ("freeze, unmounted", lambda s: s.freeze_unmounted_s),
                               ("clone, mounted", lambda s: s.clone_mounted_s),
                               ("clone, unmounted", lambda s: s.clone_unmounted_s)):
                found.append(at_most(f"{label}: {what}, {gsize}", pick(at) if at else None, GOAL_FREEZE_S))
                if at and small and config.goal_size != smallest:
                    flat = pick(at) <= max(2 * pick(small), pick(small) + 0.010)
                    found.append(Goal(f"{label}: {what}, flat in size", f"{gsize} <= max(2x, +10 ms) of {format_size(smallest)}",
                                      f"{ms(pick(small))} -> {ms(pick(at))}", flat))
        if r.case.driver == "overlay":
            for s in r.sizes:
                found.append(at_most(f"{label}: freeze, unmounted, {format_size(s.size)}", s.freeze_unmounted_s, GOAL_FREEZE_S))
                found.append(at_most(f"{label}: clone, unmounted, {format_size(s.size)}", s.clone_unmounted_s, GOAL_FREEZE_S))
            largest = _by_size(r, max(config.sizes))
            found.append(at_most(f"{label}: freeze, mounted, 1 MiB written on {format_size(max(config.sizes))} since an unmounted freeze",
                                 largest.change_freeze_s if largest else None, GOAL_FREEZE_S))
        gp = r.get_put
        found.append(at_most(f"{label}: get p50, {config.latency_depth}-layer chain", gp.get.p50 if gp else None, GOAL_GET_PUT_P50_S))
        found.append(at_most(f"{label}: put p50, {config.latency_depth}-layer chain", gp.put.p50 if gp else None, GOAL_GET_PUT_P50_S))
        share = r.diff.diff_rate / r.diff.tar_rate if r.diff else None
        found.append(at_least(f"{label}: diff throughput vs tar -c", share, GOAL_DIFF_VS_TAR, lambda v: f"{v:.0%}"))
    return found


def section(results: list[CaseResult], skipped: list[tuple[str, str]], config: DriverBenchConfig) -> Section:
    freeze_rows, change_rows, latency_rows, deep_rows, diff_rows = [], [], [], [], []
    errors = []
    for r in results:
        label = r.case.label
        for s in r.sizes:
            freeze_rows.append((label, format_size(s.size), ms(s.copy_s),
                                with_ratio(s.freeze_mounted_s, s.copy_s), with_ratio(s.freeze_unmounted_s, s.copy_s),
                                with_ratio(s.clone_mounted_s, s.copy_s), with_ratio(s.clone_unmounted_s, s.copy_s)))
            if s.change_freeze_s is not None:
                change_rows.append((label, format_size(s.size), ms(s.copy_s), with_ratio(s.change_freeze_s, s.copy_s),
                                    with_ratio(s.change_after_mounted_freeze_s, s.copy_s)))
        if r.get_put:
            g = r.get_put
            latency_rows.append((label, ms(g.get.p50), ms(g.get.p99), ms(g.put.p50), ms(g.put.p99), str(g.get.rounds)))
        if r.deep:
            d = r.deep
            deep_rows.append((label, str(d.depth), ms(d.build_s), ms(d.get.p50), ms(d.get.max), ms(d.put.p50), str(d.get.rounds)))
        if r.diff:
            f = r.diff
            diff_rows.append((label, format_size(f.size), mbps(f.diff_rate), mbps(f.tar_rate),
                              f"{f.diff_rate / f.tar_rate:.0%}", f"{f.diff_bytes / MIB:.1f}", f"{f.tar_bytes / MIB:.1f}"))
        if r.error:
            errors.append((label, f"FAILED: {r.error}"))
    tables = (
        Table("Freeze and clone of a layer vs a full copy of its data",
              ("driver", "size", "cp -a (copy)", "freeze, mounted", "freeze, unmounted", "clone, mounted", "clone, unmounted"),
              tuple(freeze_rows),
              ("copy = cp -a --reflink=never of the same tree on the same filesystem, same run; (xN) = N times faster than it",
               "clone = freeze + create of a writable child (what CreateVolume from a volume does)",
               "data: 4 MiB files of random bytes, written and fsynced before timing; page cache warm")),
        Table("Freeze of a mounted layer after a 1 MiB write since its last freeze",
              ("driver", "layer size", "cp -a (copy)", "last freeze unmounted", "last freeze mounted"), tuple(change_rows),
              ("last freeze unmounted: the layer of 'freeze, unmounted' above, then mounted, 1 MiB written, frozen",
               "last freeze mounted: the layer of 'freeze, mounted' above, still mounted, 1 MiB written, frozen")),
        Table(f"get / put latency, top of a {config.latency_depth}-layer chain",
              ("driver", "get p50", "get p99", "put p50", "put p99", "rounds"), tuple(latency_rows),
              ("get = mount (refcount 0 -> 1) where the driver mounts; put = unmount",)),
        Table("Mount of the deepest chain",
              ("driver", "layers", "build", "get p50", "get max", "put p50", "rounds"), tuple(deep_rows),
              (f"build = one freeze per level (plus a create where the driver does not rebase); {config.markers} levels spread over the chain add a file "
               "and the top must see them all",)),
        Table("diff throughput vs tar -c of the same tree",
              ("driver", "size", "diff", "tar -c", "diff/tar", "diff MiB", "tar MiB"), tuple(diff_rows),
              ("both streams read to the end by the benchmark process; best of "
               f"{config.diff_rounds}; tar reads the layer's get() view",)),
    )
    raw: dict[str, Any] = {"cases": [_raw(r) for r in results]}
    return Section("Layered drivers", tables, tuple(goals(results, config)), raw, tuple(skipped) + tuple(errors))


def _raw(result: CaseResult) -> dict[str, Any]:
    out = asdict(result)
    out["case"] = result.case.label
    for s, raw in zip(result.sizes, out["sizes"]):
        raw["clone_mounted_s"] = s.clone_mounted_s
        raw["clone_unmounted_s"] = s.clone_unmounted_s
    return out
