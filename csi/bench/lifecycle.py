"""The CSI benchmark: a real ``strata serve`` process per driver case, driven over its
unix socket by real gRPC clients (the stubs in :mod:`csi.proto`).

Per case (same cases as :mod:`csi.bench.drivers`, each with its own ``--root`` on the
case's backing filesystem):

* **lifecycle latency** — ``rounds`` rounds of CreateVolume, NodeStageVolume,
  NodePublishVolume, CreateSnapshot, NodeUnpublishVolume, NodeUnstageVolume,
  DeleteSnapshot, DeleteVolume on small empty volumes; p50/p99 per RPC, measured by the
  client around the blocking call (so it includes gRPC and the socket);
* **concurrent creates** — 8 client threads, each with its own channel, create
  ``concurrent_creates`` volumes together; creates/s = count / wall time from the
  common start to the last answer;
* **snapshot / restore / clone** of a volume holding each size of ``--sizes`` (data
  written through the published target path and fsynced before timing):
  volume A stays published: snapshot, then 1 MiB more and snapshot again (a);
  volume B is unpublished and unstaged: snapshot, restore (CreateVolume from that
  snapshot), then published again, 1 MiB written, snapshot (b), 1 MiB more, clone (b);
  volume C, unpublished: clone (CreateVolume from the volume). Overlay's "little
  changed" goal is case (b): its unpublished snapshot moved the data below the volume.
  Next to them, ``cp -a --reflink=never`` of the same tree on the same filesystem —
  what a copy-based approach pays. The vfs-on-ext4 case is itself the copy-based driver.

Everything made is deleted through the API afterwards; the plugin gets SIGTERM (then
SIGKILL after 20 s) and any mount left under the case directory is unmounted.
"""

from __future__ import annotations

import importlib.util
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
from typing import Any

import grpc

from csi.host import mount as mnt
from csi.bench.drivers import CASES, DriverCase
from csi.bench.floor import Floor, measure as measure_floor
from csi.bench.fsenv import MIB, Backing, DataSource, copy_tree, fill_tree, format_size, remove_tree, write_file
from csi.bench.report import Goal, Latency, Section, Table, at_least, at_most, ms, timed, with_ratio
from csi.errors import StrataError
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as pb_grpc

PLUGIN_MODULE = "csi.services.server"
DRIVER_NAME = "strata.csi.dev"
NODE_ID = "bench-node"
LIFECYCLE_RPCS = ("CreateVolume", "NodeStageVolume", "NodePublishVolume", "CreateSnapshot",
                  "NodeUnpublishVolume", "NodeUnstageVolume", "DeleteSnapshot", "DeleteVolume")
# issue 14's goals: CreateVolume p50 and creates/s with 8 clients (btrfs has its own), publish and
# unpublish p50 on every driver, and a vfs clone within 10 % of one plain copy of the data
GOAL_CREATE_P50_S = {"btrfs": 0.002}
GOAL_CREATE_P50_DEFAULT_S = 0.001
GOAL_PUBLISH_P50_S = 0.002
GOAL_CREATES_PER_S = {"btrfs": 700.0}
GOAL_CREATES_PER_S_DEFAULT = 1400.0
GOAL_VFS_CLONE_VS_COPY = 1.1
GOAL_SNAPSHOT_S = 0.100
CALL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LifecycleConfig:
    sizes: tuple[int, ...]
    rounds: int = 200
    clients: int = 8
    concurrent_creates: int = 400
    small_volume_bytes: int = 16 * MIB
    change_bytes: int = MIB

    @property
    def goal_size(self) -> int:
        return (1 << 30) if (1 << 30) in self.sizes else max(self.sizes)


@dataclass(frozen=True)
class DataFigures:
    """Seconds per call for a volume holding ``size`` bytes (see the module docstring)."""

    size: int
    copy_s: float
    snapshot_mounted_s: float
    snapshot_changed_after_mounted_s: float  # published, 1 MiB written since a published snapshot
    snapshot_unmounted_s: float
    restore_s: float
    clone_unmounted_s: float
    snapshot_changed_s: float  # published, 1 MiB written since an unpublished snapshot
    clone_changed_s: float  # published, 1 MiB more written since then
    copy_synced_s: float  # cp -a and a sync(1): the copy made durable, as a clone must be


@dataclass(frozen=True)
class CsiCaseResult:
    case: DriverCase
    latency: tuple[tuple[str, Latency], ...] = ()
    creates_per_s: float | None = None
    concurrent_latency: Latency | None = None
    data: tuple[DataFigures, ...] = ()
    error: str | None = None
    floor: Floor | None = None  # the same client against a bare Python gRPC server, same filesystem


class PluginError(StrataError):
    """The plugin process did not start or answered wrongly."""


def plugin_available() -> str | None:
    """None when ``strata serve`` can run here, else why not."""
    if importlib.util.find_spec(PLUGIN_MODULE) is None:
        return f"the CSI plugin ({PLUGIN_MODULE}) is not in this tree"
    return None


@dataclass(frozen=True)
class Stubs:
    channel: grpc.Channel
    identity: pb_grpc.IdentityStub
    controller: pb_grpc.ControllerStub
    node: pb_grpc.NodeStub

    @classmethod
    def connect(cls, socket: Path) -> Stubs:
        channel = grpc.insecure_channel(f"unix://{socket}")
        return cls(channel, pb_grpc.IdentityStub(channel), pb_grpc.ControllerStub(channel), pb_grpc.NodeStub(channel))


@contextmanager
def plugin(case_dir: Path, driver: str) -> Iterator[Path]:
    """Run ``strata serve`` for ``driver`` under ``case_dir``; yield its socket once Probe says ready."""
    socket = case_dir / "csi.sock"
    root = case_dir / "root"
    log_path = case_dir / "plugin.log"
    argv = [sys.executable, "-m", "csi.cli", "serve", "--endpoint", f"unix://{socket}", "--node-id", NODE_ID,
            "--root", str(root), "--driver", driver, "--driver-name", DRIVER_NAME]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, socket, log_path)
        yield socket
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for mp in mnt.mounts_under(case_dir):
            mnt.unmount(mp.target, detach=True)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return ""


def _wait_ready(proc: subprocess.Popen[bytes], socket: Path, log_path: Path, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PluginError(f"strata serve exited with {proc.returncode}: {_tail(log_path)}")
        if socket.exists():
            stubs = Stubs.connect(socket)
            try:
                answer = stubs.identity.Probe(pb.ProbeRequest(), timeout=2)
                if not answer.HasField("ready") or answer.ready.value:  # unset means ready (CSI spec)
                    return
            except grpc.RpcError:
                pass
            finally:
                stubs.channel.close()
        time.sleep(0.05)
    raise PluginError(f"strata serve not ready after {limit_s:.0f} s: {_tail(log_path)}")


def capability() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


def create_request(name: str, size: int, source: pb.VolumeContentSource | None = None) -> pb.CreateVolumeRequest:
    request = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                     volume_capabilities=[capability()])
    if source is not None:
        request.volume_content_source.CopyFrom(source)
    return request


class Session:
    """One client's view of the plugin, with the staging/target paths kubelet would use."""

    def __init__(self, stubs: Stubs, case_dir: Path) -> None:
        self.stubs = stubs
        self.kubelet = case_dir / "kubelet"
        self.kubelet.mkdir(exist_ok=True)

    def create(self, name: str, size: int, source: pb.VolumeContentSource | None = None) -> str:
        response = self.stubs.controller.CreateVolume(create_request(name, size, source), timeout=CALL_TIMEOUT_S)
        return response.volume.volume_id

    def paths(self, name: str) -> tuple[Path, Path]:
        staging = self.kubelet / "staging" / name
        target = self.kubelet / "pods" / name / "mount"
        staging.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        return staging, target

    def stage(self, volume_id: str, staging: Path) -> None:
        self.stubs.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=capability()),
            timeout=CALL_TIMEOUT_S)

    def publish(self, volume_id: str, staging: Path, target: Path) -> None:
        self.stubs.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=capability()), timeout=CALL_TIMEOUT_S)

    def unpublish(self, volume_id: str, target: Path) -> None:
        self.stubs.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)), timeout=CALL_TIMEOUT_S)

    def unstage(self, volume_id: str, staging: Path) -> None:
        self.stubs.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging)), timeout=CALL_TIMEOUT_S)

    def snapshot(self, volume_id: str, name: str) -> str:
        response = self.stubs.controller.CreateSnapshot(pb.CreateSnapshotRequest(
            source_volume_id=volume_id, name=name), timeout=CALL_TIMEOUT_S)
        return response.snapshot.snapshot_id

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.stubs.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=CALL_TIMEOUT_S)

    def delete(self, volume_id: str) -> None:
        self.stubs.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=CALL_TIMEOUT_S)


def measure_lifecycle(session: Session, config: LifecycleConfig) -> tuple[tuple[str, Latency], ...]:
    samples: dict[str, list[float]] = {rpc: [] for rpc in LIFECYCLE_RPCS}

    def step(rpc: str, action: Callable[[], Any]) -> Any:
        seconds, result = timed(action)
        samples[rpc].append(seconds)
        return result

    for index in range(config.rounds):
        name = f"life-{index}"
        staging, target = session.paths(name)
        volume_id = step("CreateVolume", lambda: session.create(name, config.small_volume_bytes))
        step("NodeStageVolume", lambda: session.stage(volume_id, staging))
        step("NodePublishVolume", lambda: session.publish(volume_id, staging, target))
        snapshot_id = step("CreateSnapshot", lambda: session.snapshot(volume_id, f"{name}-snap"))
        step("NodeUnpublishVolume", lambda: session.unpublish(volume_id, target))
        step("NodeUnstageVolume", lambda: session.unstage(volume_id, staging))
        step("DeleteSnapshot", lambda: session.delete_snapshot(snapshot_id))
        step("DeleteVolume", lambda: session.delete(volume_id))
    return tuple((rpc, Latency.of(samples[rpc])) for rpc in LIFECYCLE_RPCS)


def measure_concurrent_creates(socket: Path, case_dir: Path, config: LifecycleConfig) -> tuple[float, Latency]:
    """``clients`` threads, one channel each, create volumes together; returns creates/s."""
    per_client = max(1, config.concurrent_creates // config.clients)
    barrier = threading.Barrier(config.clients + 1)
    latencies: list[list[float]] = [[] for _ in range(config.clients)]
    made: list[list[str]] = [[] for _ in range(config.clients)]
    errors: list[BaseException] = []
    ends: list[float] = []

    def client(index: int) -> None:
        stubs = Stubs.connect(socket)
        try:
            stubs.identity.Probe(pb.ProbeRequest(), timeout=10)  # connect before the start line
            barrier.wait()
            for n in range(per_client):
                seconds, response = timed(lambda: stubs.controller.CreateVolume(
                    create_request(f"par-{index}-{n}", config.small_volume_bytes), timeout=CALL_TIMEOUT_S))
                latencies[index].append(seconds)
                made[index].append(response.volume.volume_id)
            ends.append(time.perf_counter())
        except BaseException as exc:  # reported below, after every thread joined
            errors.append(exc)
            barrier.abort()
        finally:
            stubs.channel.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(config.clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    stubs = Stubs.connect(socket)
    try:
        for volume_id in (v for vs in made for v in vs):
            stubs.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=CALL_TIMEOUT_S)
    finally:
        stubs.channel.close()
    if errors:
        raise PluginError(f"concurrent CreateVolume failed: {errors[0]!r}")
    total = per_client * config.clients
    return total / (max(ends) - start), Latency.of([s for ls in latencies for s in ls])


def _published_volume(session: Session, name: str, size: int, data: DataSource) -> tuple[str, Path, Path]:
    """A published volume holding ``size`` bytes (written and fsynced); returns id, staging, target."""
    volume_id = session.create(name, 2 * size + 64 * MIB)
    staging, target = session.paths(name)
    session.stage(volume_id, staging)
    session.publish(volume_id, staging, target)
    fill_tree(target, size, data)
    os.sync()
    return volume_id, staging, target


def measure_data(session: Session, backing: Backing, size: int, data: DataSource,
                 config: LifecycleConfig) -> DataFigures:
    volumes: list[str] = []
    snapshots: list[str] = []
    published: dict[str, tuple[Path, Path]] = {}
    tag = format_size(size).lower()
    capacity = 2 * size + 64 * MIB

    def settled(action: Callable[[], Any]) -> tuple[float, Any]:
        seconds, result = timed(action)
        os.sync()
        return seconds, result

    def filled(name: str) -> tuple[str, Path]:
        volume_id, staging, target = _published_volume(session, name, size, data)
        volumes.append(volume_id)
        published[volume_id] = (staging, target)
        return volume_id, target

    def republish(volume_id: str, name: str) -> Path:
        staging, target = session.paths(name)
        session.stage(volume_id, staging)
        session.publish(volume_id, staging, target)
        published[volume_id] = (staging, target)
        return target

    def unpublish(volume_id: str) -> None:
        staging, target = published.pop(volume_id)
        session.unpublish(volume_id, target)
        session.unstage(volume_id, staging)
        os.sync()

    def change(target: Path, name: str) -> None:
        write_file(target / name, config.change_bytes, data)
        os.sync()

    def snapshot(volume_id: str, name: str) -> tuple[float, str]:
        seconds, snapshot_id = settled(lambda: session.snapshot(volume_id, name))
        snapshots.append(snapshot_id)
        return seconds, snapshot_id

    def create(name: str, source: pb.VolumeContentSource) -> float:
        seconds, volume_id = settled(lambda: session.create(name, capacity, source))
        volumes.append(volume_id)
        return seconds

    def from_volume(volume_id: str) -> pb.VolumeContentSource:
        return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=volume_id))

    try:
        a, a_target = filled(f"a-{tag}")
        copy_dir = backing.fresh_dir("csi-copy")
        copy_s, _ = settled(lambda: copy_tree(a_target, copy_dir / "tree"))
        remove_tree(copy_dir)
        os.sync()
        copy_dir = backing.fresh_dir("csi-copy")  # the durable copy: cp -a, then sync(1) until it is on disk
        copy_synced_s, _ = timed(lambda: (copy_tree(a_target, copy_dir / "tree"), os.sync()))
        remove_tree(copy_dir)
        snap_m, _ = snapshot(a, f"a-{tag}-s1")
        change(a_target, "small-change")
        snap_ma, _ = snapshot(a, f"a-{tag}-s2")
        unpublish(a)

        b, _ = filled(f"b-{tag}")
        unpublish(b)
        snap_u, snap_b = snapshot(b, f"b-{tag}-s1")
        source = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap_b))
        restore_s = create(f"b-{tag}-restore", source)
        b_target = republish(b, f"b-{tag}-again")
        change(b_target, "small-change")
        snap_c, _ = snapshot(b, f"b-{tag}-s2")
        change(b_target, "small-change-2")
        clone_c = create(f"b-{tag}-clone", from_volume(b))

        c, _ = filled(f"c-{tag}")
        unpublish(c)
        clone_u = create(f"c-{tag}-clone", from_volume(c))
    finally:
        for volume_id in list(published):
            unpublish(volume_id)
        for volume_id in reversed(volumes):
            session.delete(volume_id)
        for snapshot_id in snapshots:
            session.delete_snapshot(snapshot_id)
        os.sync()
    return DataFigures(size, copy_s, snap_m, snap_ma, snap_u, restore_s, clone_u, snap_c, clone_c, copy_synced_s)


def run_case(case: DriverCase, backing: Backing, config: LifecycleConfig, data: DataSource,
             progress: Callable[[str], None]) -> CsiCaseResult:
    case_dir = backing.fresh_dir(f"csi-{case.driver}")
    latency: tuple[tuple[str, Latency], ...] = ()
    rate: float | None = None
    concurrent: Latency | None = None
    figures: list[DataFigures] = []
    floor: Floor | None = None
    try:
        progress(f"CSI {case.label}: the floor (bare Python gRPC server, one sqlite sync)")
        floor = measure_floor(case_dir, config.rounds, config.clients)
        with plugin(case_dir, case.driver) as socket:
            stubs = Stubs.connect(socket)
            try:
                session = Session(stubs, case_dir)
                progress(f"CSI {case.label}: lifecycle x{config.rounds}")
                latency = measure_lifecycle(session, config)
                progress(f"CSI {case.label}: {config.clients} clients creating")
                rate, concurrent = measure_concurrent_creates(socket, case_dir, config)
                for size in config.sizes:
                    progress(f"CSI {case.label}: snapshot/restore/clone of {format_size(size)}")
                    figures.append(measure_data(session, backing, size, data, config))
            finally:
                stubs.channel.close()
    except (StrataError, OSError, grpc.RpcError, subprocess.CalledProcessError) as exc:
        detail = exc.details() if isinstance(exc, grpc.RpcError) and hasattr(exc, "details") else str(exc)
        return CsiCaseResult(case, latency, rate, concurrent, tuple(figures), f"{type(exc).__name__}: {detail}",
                             floor)
    finally:
        for mp in mnt.mounts_under(case_dir):
            mnt.unmount(mp.target, detach=True)
        remove_tree(case_dir)
    return CsiCaseResult(case, latency, rate, concurrent, tuple(figures), floor=floor)


def run(backings: dict[str, Backing], unavailable: dict[str, str], config: LifecycleConfig,
        drivers: tuple[str, ...], progress: Callable[[str], None]) -> tuple[list[CsiCaseResult], list[tuple[str, str]]]:
    data = DataSource()
    results: list[CsiCaseResult] = []
    skipped: list[tuple[str, str]] = []
    missing = plugin_available()
    for case in CASES:
        if case.driver not in drivers:
            continue
        if missing:
            skipped.append((f"CSI {case.label}", missing))
        elif case.backing not in backings:
            skipped.append((f"CSI {case.label}", unavailable.get(case.backing, f"no {case.backing} filesystem")))
        else:
            results.append(run_case(case, backings[case.backing], config, data, progress))
    return results, skipped


# ---------------------------------------------------------------------- report


def goals(results: list[CsiCaseResult], config: LifecycleConfig) -> list[Goal]:
    found: list[Goal] = []
    gsize = format_size(config.goal_size)
    for r in results:
        label = r.case.label
        lat = dict(r.latency)
        driver = r.case.driver
        found.append(at_most(f"CSI {label}: CreateVolume p50", lat["CreateVolume"].p50 if "CreateVolume" in lat
                             else None, GOAL_CREATE_P50_S.get(driver, GOAL_CREATE_P50_DEFAULT_S)))
        for rpc in ("NodePublishVolume", "NodeUnpublishVolume"):
            found.append(at_most(f"CSI {label}: {rpc} p50", lat[rpc].p50 if rpc in lat else None, GOAL_PUBLISH_P50_S))
        found.append(at_least(f"CSI {label}: CreateVolume, {config.clients} clients", r.creates_per_s,
                              GOAL_CREATES_PER_S.get(driver, GOAL_CREATES_PER_S_DEFAULT), lambda v: f"{v:.0f}/s"))
        if driver == "vfs":
            for d in r.data:
                found.append(at_most(f"CSI {label}: clone of {format_size(d.size)} vs one cp -a "
                                     f"({ms(d.copy_s)} x {GOAL_VFS_CLONE_VS_COPY})", d.clone_unmounted_s,
                                     d.copy_s * GOAL_VFS_CLONE_VS_COPY))
                found.append(at_most(f"CSI {label}: clone of {format_size(d.size)} vs cp -a + sync "
                                     f"({ms(d.copy_synced_s)} x {GOAL_VFS_CLONE_VS_COPY})", d.clone_unmounted_s,
                                     d.copy_synced_s * GOAL_VFS_CLONE_VS_COPY))
        at = next((d for d in r.data if d.size == config.goal_size), None)
        picks: tuple[tuple[str, Callable[[DataFigures], float]], ...] = ()
        if r.case.driver == "btrfs":
            picks = (("snapshot, published", lambda d: d.snapshot_mounted_s),
                     ("snapshot, unpublished", lambda d: d.snapshot_unmounted_s),
                     ("restore", lambda d: d.restore_s),
                     ("clone, unpublished", lambda d: d.clone_unmounted_s),
                     ("clone, published", lambda d: d.clone_changed_s))
        elif r.case.driver == "overlay":
            picks = (("snapshot, unpublished", lambda d: d.snapshot_unmounted_s),
                     ("restore", lambda d: d.restore_s),
                     ("clone, unpublished", lambda d: d.clone_unmounted_s),
                     ("snapshot, published, 1 MiB changed (b)", lambda d: d.snapshot_changed_s),
                     ("clone, published, 1 MiB changed (b)", lambda d: d.clone_changed_s))
        for what, pick in picks:
            found.append(at_most(f"CSI {label}: {what}, {gsize}", pick(at) if at else None, GOAL_SNAPSHOT_S))
    return found


def section(results: list[CsiCaseResult], skipped: list[tuple[str, str]], config: LifecycleConfig) -> Section:
    latency_rows, create_rows, data_rows, floor_rows = [], [], [], []
    errors = []
    for r in results:
        label = r.case.label
        lat = dict(r.latency)
        if r.floor is not None and "CreateVolume" in lat:
            f = r.floor
            floor_rows.append((label, ms(f.rpc.p50), ms(f.durable.p50), ms(lat["CreateVolume"].p50),
                               ms(lat["CreateVolume"].p50 - f.durable.p50),
                               *(ms(lat[rpc].p50) for rpc in ("NodePublishVolume", "NodeUnpublishVolume")),
                               f"{f.calls_per_s:.0f}/s",
                               f"{r.creates_per_s:.0f}/s" if r.creates_per_s is not None else "-"))
        for rpc, lat in r.latency:
            latency_rows.append((label, rpc, ms(lat.p50), ms(lat.p99), ms(lat.max), str(lat.rounds)))
        if r.creates_per_s is not None and r.concurrent_latency is not None:
            c = r.concurrent_latency
            create_rows.append((label, str(config.clients), str(c.rounds), f"{r.creates_per_s:.0f}/s", ms(c.p50), ms(c.p99)))
        for d in r.data:
            data_rows.append((label, format_size(d.size), ms(d.copy_s), ms(d.copy_synced_s),
                              *(with_ratio(v, d.copy_s) for v in (
                                  d.snapshot_mounted_s, d.snapshot_changed_after_mounted_s, d.snapshot_unmounted_s,
                                  d.restore_s, d.clone_unmounted_s, d.snapshot_changed_s, d.clone_changed_s))))
        if r.error:
            errors.append((f"CSI {label}", f"FAILED: {r.error}"))
    tables = (
        Table(f"CSI lifecycle latency over {config.rounds} rounds (real strata serve, unix socket)",
              ("driver", "RPC", "p50", "p99", "max", "calls"), tuple(latency_rows),
              ("client-side time around each blocking call; empty volumes; snapshot taken while published",)),
        Table("Concurrent CreateVolume", ("driver", "clients", "creates", "rate", "p50", "p99"), tuple(create_rows),
              ("one channel per client thread; rate = creates / (last answer - common start)",)),
        Table("Against the floor: the same client and gRPC library, a bare Python server (csi.bench.floor)",
              ("driver", "empty call", "durable call", "CreateVolume", "above durable", "Publish", "Unpublish",
               f"empty calls, {config.clients} clients", "creates"), tuple(floor_rows),
              ("empty call = Probe answered at once; durable call = one sqlite WAL commit with synchronous=FULL "
               "(one fdatasync) on the case's filesystem; p50 each, same run",
               "a durable CreateVolume cannot answer below the durable call, nor create faster than empty calls")),
        Table("Snapshot / restore / clone of a volume holding data vs a full copy",
              ("driver", "size", "cp -a (copy)", "cp -a + sync", "snap pub", "snap pub +1M (a)", "snap unpub", "restore",
               "clone unpub", "snap pub +1M (b)", "clone pub +1M (b)"), tuple(data_rows),
              ("cp -a = cp -a --reflink=never of the volume's tree on the same filesystem, same run; (xN) = N times "
               "faster than it; cp -a + sync = that copy until sync(1) has put it on disk (a clone is durable when "
               "acknowledged)",
               "pub / unpub = the source volume is published (staged, mounted) / not; restore = CreateVolume from "
               "the unpub snapshot",
               "+1M (a): 1 MiB written since a snapshot taken while published; (b): since one taken while unpublished",
               "vfs on ext4 is itself the copy-based driver")),
    )
    raw = {"cases": [{**asdict(r), "case": r.case.label} for r in results]}
    return Section("CSI plugin", tables, tuple(goals(results, config)), raw, tuple(skipped) + tuple(errors))
