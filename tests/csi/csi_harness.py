"""Test harness for the CSI plugin: a real server on a real unix socket, real stubs.

:class:`Harness` holds a running :class:`csi.services.server.ServerHandle` (in-process)
and gRPC stubs over its socket, a kubelet-like directory tree (``<base>/kubelet/...``),
and helpers to build requests and to snapshot what is on disk.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc
from csi.services.server import ServeConfig, ServerHandle, start_server

NODE = "node-a"
MiB = 1 << 20
RWO = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER


def mount_cap(mode: int = RWO, flags: tuple[str, ...] = (), group: str = "", fs_type: str = "") -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags),
                                                                     volume_mount_group=group),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


def block_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(mode=RWO))


@dataclass
class Stubs:
    channel: grpc.Channel
    identity: rpc.IdentityStub = field(init=False)
    controller: rpc.ControllerStub = field(init=False)
    node: rpc.NodeStub = field(init=False)
    group: rpc.GroupControllerStub = field(init=False)

    def __post_init__(self) -> None:
        self.identity = rpc.IdentityStub(self.channel)
        self.controller = rpc.ControllerStub(self.channel)
        self.node = rpc.NodeStub(self.channel)
        self.group = rpc.GroupControllerStub(self.channel)


def connect(endpoint: str) -> Stubs:
    channel = grpc.insecure_channel(endpoint)
    grpc.channel_ready_future(channel).result(timeout=20)
    return Stubs(channel)


class Harness:
    """A plugin served from ``base/root`` on ``base/csi.sock`` with a kubelet tree in ``base/kubelet``."""

    def __init__(self, base: Path, driver: str) -> None:
        self.base = base
        self.driver_name = driver
        self.root = base / "root"
        self.kubelet = base / "kubelet"
        (self.kubelet / "plugins").mkdir(parents=True, exist_ok=True)
        (self.kubelet / "pods").mkdir(parents=True, exist_ok=True)
        self.config = ServeConfig(root=self.root, endpoint=f"unix://{base}/csi.sock", node_id=NODE, driver=driver,
                                  grace_seconds=5)
        self.handle: ServerHandle | None = None
        self.stubs: Stubs | None = None

    # ---------------------------------------------------------------- life

    def start(self) -> Harness:
        self.handle = start_server(self.config)
        self.stubs = connect(self.handle.endpoint)
        return self

    def stop(self) -> None:
        if self.stubs is not None:
            self.stubs.channel.close()
            self.stubs = None
        if self.handle is not None:
            self.handle.stop(grace=5)
            self.handle = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def teardown(self) -> None:
        self.stop()
        for mp in mnt.mounts_under(self.base):
            mnt.unmount(mp.target, detach=True)

    @property
    def identity(self) -> rpc.IdentityStub:
        assert self.stubs is not None
        return self.stubs.identity

    @property
    def controller(self) -> rpc.ControllerStub:
        assert self.stubs is not None
        return self.stubs.controller

    @property
    def node(self) -> rpc.NodeStub:
        assert self.stubs is not None
        return self.stubs.node

    @property
    def group(self) -> rpc.GroupControllerStub:
        assert self.stubs is not None
        return self.stubs.group

    # ---------------------------------------------------------------- kubelet-like paths

    def staging_path(self, name: str) -> Path:
        path = self.kubelet / "plugins" / "kubernetes.io" / "csi" / name / "globalmount"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def target_path(self, pod: str, name: str = "vol") -> Path:
        path = self.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / name / "mount"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ---------------------------------------------------------------- calls

    def create_volume(self, name: str, size: int = MiB, source: pb.VolumeContentSource | None = None,
                      **extra: Any) -> pb.Volume:
        request = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                         volume_capabilities=[mount_cap()], volume_content_source=source, **extra)
        return self.controller.CreateVolume(request).volume

    def snapshot(self, name: str, volume_id: str) -> pb.Snapshot:
        return self.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)).snapshot

    def stage(self, volume_id: str, staging: Path, cap: pb.VolumeCapability | None = None) -> None:
        self.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging),
                                                            volume_capability=cap or mount_cap()))

    def publish(self, volume_id: str, staging: Path, target: Path, readonly: bool = False,
                cap: pb.VolumeCapability | None = None) -> None:
        self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap or mount_cap(), readonly=readonly))

    def unpublish(self, volume_id: str, target: Path) -> None:
        self.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)))

    def unstage(self, volume_id: str, staging: Path) -> None:
        self.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id,
                                                                staging_target_path=str(staging)))

    def mounted(self, volume_id: str, pod: str) -> tuple[Path, Path]:
        """Stage and publish ``volume_id`` for ``pod``; return (staging, target)."""
        staging, target = self.staging_path(pod), self.target_path(pod)
        self.stage(volume_id, staging)
        self.publish(volume_id, staging, target)
        return staging, target

    def release(self, volume_id: str, staging: Path, target: Path) -> None:
        self.unpublish(volume_id, target)
        self.unstage(volume_id, staging)

    # ---------------------------------------------------------------- inspection

    def disk_state(self) -> dict[str, Any]:
        """Everything observable on disk: the file tree (content hashes), the mounts, the
        records of the plugin and of the driver. Database files are compared by content."""
        tree: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.base):
            dirnames.sort()
            for name in sorted(dirnames):
                tree[os.path.relpath(os.path.join(dirpath, name), self.base) + "/"] = "dir"
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.base)
                if name.endswith((".db", ".db-wal", ".db-shm")) or name == "csi.sock":
                    continue
                try:
                    with open(path, "rb") as f:
                        tree[rel] = hashlib.sha256(f.read()).hexdigest()
                except OSError:
                    tree[rel] = "unreadable"
        mounts = sorted(mp.target for mp in mnt.mounts_under(self.base))
        plugin = self.handle.plugin if self.handle else None
        records = {}
        if plugin is not None:
            records = {"volumes": plugin.store.volumes(), "snapshots": plugin.store.snapshots(),
                       "groups": plugin.store.groups(),
                       "publications": plugin.store.publications(),
                       "layers": sorted((l.id, l.parent, l.kind, l.hidden, l.mounts, l.state)
                                        for l in plugin.driver.store.all())}
        return {"tree": tree, "mounts": mounts, "records": records}


def files_of(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path`` with its bytes (byte-for-byte comparisons)."""
    result = {}
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            result[os.path.relpath(full, path)] = Path(full).read_bytes()
    return result


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """Run ``call``; return the gRPC status code it ended with (OK when it succeeded)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def accepts(sock: Path) -> bool:
    """Whether a server listens on the unix socket ``sock`` (a stale socket file refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


class ServeProcess:
    """``strata serve`` as a child process (for kill -9 tests)."""

    def __init__(self, harness: Harness, log: Path) -> None:
        self.harness, self.log = harness, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Stubs:
        cfg = self.harness.config
        args = [sys.executable, "-m", "csi.cli", "serve", "--endpoint", cfg.endpoint, "--node-id", cfg.node_id,
                "--root", str(cfg.root), "--driver", cfg.driver, "--grace", "5",
                *(f"--storage-opt={key}={value}" for key, value in cfg.storage_opts)]
        sock = cfg.socket_path()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not accepts(sock):  # a killed server's socket file stays behind: wait for a listener
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strata serve did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return connect(f"unix://{sock}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def record_mounts_as_if_selinux(monkeypatch: Any) -> list[mnt.Mount]:
    """Where this kernel has no SELinux: make the drivers believe it has (``/sys/fs/selinux``),
    record every mount(2) request (returned list) and pass it on without its ``context=``
    option, which the kernel would refuse. A stand-in for an SELinux kernel, said so here."""
    seen: list[mnt.Mount] = []
    real_isdir, real_mount = os.path.isdir, mnt.mount

    def isdir(path: object) -> bool:
        return True if path == "/sys/fs/selinux" else real_isdir(path)  # type: ignore[arg-type]

    def record(m: mnt.Mount, target: object) -> None:
        seen.append(m)
        without = tuple(o for o in m.options if not o.startswith("context="))
        real_mount(mnt.Mount(m.fstype, m.source, without, m.cwd), target)  # type: ignore[arg-type]

    monkeypatch.setattr(os.path, "isdir", isdir)
    monkeypatch.setattr(mnt, "mount", record)
    return seen
