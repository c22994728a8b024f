"""The scale benchmark (``strata bench --parts scale``): a real ``strata serve`` process per
driver case holding many volumes and snapshots, with curves rather than end points.

Per case, with ``volumes`` volumes and ``snapshots`` snapshots as the target (10,000 and
2,500 by default):

* **CreateVolume p50 by population** — at each checkpoint (0, then every tenth of the
  target) ``probe`` sequential CreateVolume calls are timed; between checkpoints 8 client
  threads fill the node up to the next one; a snapshot is taken of every fourth volume made
  until ``snapshots`` exist. Goal: the p50 at the full population is within 20 % of the
  empty node's.
* **ListVolumes pages** — at each checkpoint, a full paged listing with ``max_entries=500``:
  the time of each page by its position (first, middle, last) and of the whole listing.
  Goal: every page ≤ 10 ms wherever it lies.
* **restart to ready** — SIGTERM, a new process on the same root, time until Probe answers
  ready (start-up recovery included). Goal ≤ 2 s at the full population. The plugin's
  bytecode is cached (in the case directory) as in an installed package; the first start
  compiles it.
* **memory** — the plugin's RSS (``/proc/PID/status`` VmRSS) at each checkpoint and during
  ``cycles`` create/delete cycles after the fill (sampled every tenth). Goals: ≤ 80 MB, and
  not growing over the cycles (last sample ≤ first + 5 %).

Nothing is deleted at the end but the case directory itself (the plugin is stopped first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from csi.bench.drivers import CASES, DriverCase
from csi.bench.fsenv import Backing, remove_tree
from csi.bench.lifecycle import DRIVER_NAME, NODE_ID, PluginError, Stubs, create_request, plugin_available
from csi.bench.report import Goal, Latency, Section, Table, at_most, ms, timed
from csi.errors import StrataError
from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb

PAGE = 500
GOAL_PAGE_S = 0.010
GOAL_RESTART_S = 2.0
GOAL_RSS_BYTES = 80 << 20
GOAL_CREATE_GROWTH = 0.20
GOAL_RSS_GROWTH = 0.05
SMALL = 1 << 20


@dataclass(frozen=True)
class ScaleConfig:
    volumes: int = 10_000
    snapshots: int = 2_500
    probe: int = 50
    checkpoints: int = 10
    cycles: int = 10_000
    clients: int = 8


@dataclass(frozen=True)
class Checkpoint:
    volumes: int
    snapshots: int
    create: Latency
    page_first_s: float
    page_middle_s: float
    page_last_s: float
    page_max_s: float
    listing_s: float
    rss_bytes: int


@dataclass(frozen=True)
class ScaleResult:
    case: DriverCase
    checkpoints: tuple[Checkpoint, ...] = ()
    restart_s: float | None = None
    cycle_rss: tuple[tuple[int, int], ...] = ()  # (cycles done, RSS bytes)
    error: str | None = None


class _Plugin:
    """A ``strata serve`` process on ``root`` that can be restarted."""

    def __init__(self, case_dir: Path, driver: str) -> None:
        self.case_dir, self.driver = case_dir, driver
        self.socket = case_dir / "csi.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; returns seconds until Probe says ready."""
        argv = [sys.executable, "-m", "csi.cli", "serve", "--endpoint", f"unix://{self.socket}",
                "--node-id", NODE_ID, "--root", str(self.case_dir / "root"), "--driver", self.driver,
                "--driver-name", DRIVER_NAME, "--log-level", "warning"]
        log = open(self.case_dir / "plugin.log", "ab")
        # bytecode cached in the case directory, as an installed package has it (pip compiles at
        # install): with PYTHONDONTWRITEBYTECODE set, every start would compile the whole program
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(self.case_dir / "pycache")}
        started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PluginError(f"strata serve exited with {self.proc.returncode}")
            if self.socket.exists():
                stubs = Stubs.connect(self.socket)
                try:
                    answer = stubs.identity.Probe(pb.ProbeRequest(), timeout=2)
                    if not answer.HasField("ready") or answer.ready.value:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                finally:
                    stubs.channel.close()
            time.sleep(0.005)
        raise PluginError("strata serve not ready after 120 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def rss(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


@contextmanager
def _running(case_dir: Path, driver: str) -> Iterator[_Plugin]:
    proc = _Plugin(case_dir, driver)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        for mp in mnt.mounts_under(case_dir):
            mnt.unmount(mp.target, detach=True)


def _fill(socket: Path, start: int, stop: int, snapshot_until: int, clients: int, prefix: str) -> int:
    """Create volumes ``start..stop-1`` with ``clients`` threads, snapshotting every fourth one
    while fewer than ``snapshot_until`` snapshots exist; returns the snapshots made."""
    made = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    numbers = iter(range(start, stop))

    def client() -> None:
        stubs = Stubs.connect(socket)
        try:
            while True:
                with lock:
                    n = next(numbers, None)
                    snap = n is not None and n % 4 == 0 and n // 4 < snapshot_until
                if n is None:
                    return
                vid = stubs.controller.CreateVolume(create_request(f"{prefix}{n}", SMALL), timeout=120).volume.volume_id
                if snap:
                    stubs.controller.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vid, name=f"s{n}"),
                                                    timeout=120)
                    with lock:
                        made[0] += 1
        except BaseException as exc:  # reported after the join
            errors.append(exc)
        finally:
            stubs.channel.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise PluginError(f"filling the node failed: {errors[0]!r}")
    return made[0]


def _listing(stubs: Stubs) -> tuple[list[float], float]:
    pages: list[float] = []
    token = ""
    started = time.perf_counter()
    while True:
        seconds, answer = timed(lambda: stubs.controller.ListVolumes(
            pb.ListVolumesRequest(max_entries=PAGE, starting_token=token), timeout=120))
        pages.append(seconds)
        token = answer.next_token
        if not token:
            return pages, time.perf_counter() - started


def run_case(case: DriverCase, backing: Backing, config: ScaleConfig, progress: Callable[[str], None]) -> ScaleResult:
    case_dir = backing.fresh_dir(f"scale-{case.driver}")
    points: list[Checkpoint] = []
    cycle_rss: list[tuple[int, int]] = []
    restart: float | None = None
    try:
        with _running(case_dir, case.driver) as proc:
            stubs = Stubs.connect(proc.socket)
            try:
                for i in range(5):  # warm-up: the first calls pay for imports and connections
                    answer = stubs.controller.CreateVolume(create_request(f"warm-{i}", SMALL), timeout=120)
                    stubs.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=answer.volume.volume_id), timeout=120)
                volumes = snapshots = 0
                step = max(1, config.volumes // config.checkpoints)
                targets = list(range(0, config.volumes + 1, step))
                for target in targets:
                    if target > volumes:
                        progress(f"scale {case.label}: filling to {target} volumes")
                        snapshots += _fill(proc.socket, volumes, target, config.snapshots, config.clients, "fill-")
                        volumes = target
                    probes = []
                    for i in range(config.probe):
                        seconds, answer = timed(lambda: stubs.controller.CreateVolume(
                            create_request(f"probe-{target}-{i}", SMALL), timeout=120))
                        probes.append(seconds)
                        stubs.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=answer.volume.volume_id),
                                                      timeout=120)
                    pages, listing = _listing(stubs)
                    points.append(Checkpoint(volumes, snapshots, Latency.of(probes), pages[0], pages[len(pages) // 2],
                                             pages[-1], max(pages), listing, proc.rss()))
                progress(f"scale {case.label}: {config.cycles} create/delete cycles")
                every = max(1, config.cycles // 10)
                for n in range(config.cycles):
                    vid = stubs.controller.CreateVolume(create_request(f"cycle-{n}", SMALL), timeout=120).volume.volume_id
                    stubs.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=120)
                    if n % every == 0 or n == config.cycles - 1:
                        cycle_rss.append((n + 1, proc.rss()))
            finally:
                stubs.channel.close()
            progress(f"scale {case.label}: restart with {volumes} volumes, {snapshots} snapshots")
            proc.stop()
            restart = proc.start()
    except (StrataError, OSError, grpc.RpcError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) and hasattr(exc, "details") else str(exc)
        return ScaleResult(case, tuple(points), restart, tuple(cycle_rss), f"{type(exc).__name__}: {detail}")
    finally:
        remove_tree(case_dir)
    return ScaleResult(case, tuple(points), restart, tuple(cycle_rss))


def run(backings: dict[str, Backing], unavailable: dict[str, str], config: ScaleConfig, drivers: tuple[str, ...],
        progress: Callable[[str], None]) -> tuple[list[ScaleResult], list[tuple[str, str]]]:
    results: list[ScaleResult] = []
    skipped: list[tuple[str, str]] = []
    missing = plugin_available()
    for case in CASES:
        if case.driver not in drivers or case.label in {r.case.label for r in results}:
            continue
        if missing:
            skipped.append((f"scale {case.label}", missing))
        elif case.backing not in backings:
            skipped.append((f"scale {case.label}", unavailable.get(case.backing, f"no {case.backing} filesystem")))
        else:
            results.append(run_case(case, backings[case.backing], config, progress))
    return results, skipped


def goals(results: list[ScaleResult]) -> list[Goal]:
    found: list[Goal] = []
    for r in results:
        label = r.case.label
        if len(r.checkpoints) >= 2:
            empty, full = r.checkpoints[0], r.checkpoints[-1]
            limit = empty.create.p50 * (1 + GOAL_CREATE_GROWTH)
            found.append(at_most(f"scale {label}: CreateVolume p50 at {full.volumes} volumes vs empty "
                                 f"({ms(empty.create.p50)} +20 %)", full.create.p50, limit))
        worst = max((c.page_max_s for c in r.checkpoints), default=None)
        found.append(at_most(f"scale {label}: slowest ListVolumes page of {PAGE}", worst, GOAL_PAGE_S))
        found.append(at_most(f"scale {label}: restart to ready Probe", r.restart_s, GOAL_RESTART_S))
        peak = max([c.rss_bytes for c in r.checkpoints] + [b for _, b in r.cycle_rss], default=None)
        found.append(Goal(f"scale {label}: plugin RSS peak", "<= 80 MB", f"{peak / 2**20:.0f} MB" if peak else "n/a",
                          None if peak is None else peak <= GOAL_RSS_BYTES))
        if len(r.cycle_rss) >= 2:
            first, last = r.cycle_rss[0][1], r.cycle_rss[-1][1]
            found.append(Goal(f"scale {label}: RSS over {r.cycle_rss[-1][0]} create/delete cycles", "growth <= 5 %",
                              f"{first / 2**20:.1f} -> {last / 2**20:.1f} MB", last <= first * (1 + GOAL_RSS_GROWTH)))
    return found


def section(results: list[ScaleResult], skipped: list[tuple[str, str]], config: ScaleConfig) -> Section:
    rows, rss_rows, errors = [], [], []
    for r in results:
        for c in r.checkpoints:
            rows.append((r.case.label, str(c.volumes), str(c.snapshots), ms(c.create.p50), ms(c.create.p99),
                         ms(c.page_first_s), ms(c.page_middle_s), ms(c.page_last_s), ms(c.listing_s),
                         f"{c.rss_bytes / 2**20:.0f} MB"))
        rss_rows.append((r.case.label, ms(r.restart_s) if r.restart_s is not None else "n/a",
                         "  ".join(f"{n}:{b / 2**20:.1f}" for n, b in r.cycle_rss)))
        if r.error:
            errors.append((f"scale {r.case.label}", f"FAILED: {r.error}"))
    tables = (
        Table(f"Scale: a node filling up to {config.volumes} volumes and {config.snapshots} snapshots",
              ("driver", "volumes", "snapshots", "create p50", "create p99", f"page 1 ({PAGE})", "middle page",
               "last page", "whole listing", "RSS"), tuple(rows),
              (f"create = {config.probe} sequential CreateVolume (then deleted) at that population; "
               f"pages = ListVolumes max_entries={PAGE} through the tokens",)),
        Table("Restart and memory over create/delete cycles", ("driver", "restart to ready", "RSS by cycles (n:MB)"),
              tuple(rss_rows), ("restart = SIGTERM, new process, time until Probe is ready (recovery included)",)),
    )
    raw = {"cases": [{**asdict(r), "case": r.case.label} for r in results]}
    return Section("Scale", tables, tuple(goals(results)), raw, tuple(skipped) + tuple(errors))
