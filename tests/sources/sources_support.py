"""Helpers of the content-source tests, under a unique module name (tests import them from
here, never from ``conftest``); the fixtures are in conftest.py.

* :class:`Node` (the ``nodes(driver)`` fixture's factory): ``node_main.py`` processes (``strata serve``'s
  start-up plus a TLS peer listener stand-in, see its docstring), each with its own root on the
  filesystem the driver needs (ext4 for vfs/overlay, the session's btrfs loop filesystem for
  btrfs), its own unix socket, and a TLS listener on its own loopback address (127.0.0.N) —
  network namespaces are the channel's own tests' business; addresses differ per node so a
  node that is gone is really gone. Certificates are made by the test (``tls_helpers``).
* :class:`Registry` — Debian's ``docker-registry`` (tests/backup/registry_support.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "csi"))
sys.path.insert(0, str(TESTS / "export"))
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "backup"))

from csi_harness import Stubs, connect, mount_cap  # noqa: E402
from registry_support import Registry  # noqa: E402,F401 - the tests' type for the registry fixtures
from tls_helpers import Pki  # noqa: E402

from csi.proto import csi_pb2 as pb  # noqa: E402


MiB = 1 << 20


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Node:
    """One strata node process (see the module docstring)."""

    def __init__(self, base: Path, node_id: str, driver: str, ip: str, pki: Pki, env: dict[str, str]) -> None:
        self.base, self.node_id, self.driver, self.ip, self.pki = base, node_id, driver, ip, pki
        self.root = base / "root"
        self.socket = base / "csi.sock"
        self.log = base / "node.log"
        self.port = _free_port(ip)
        self.env = env
        self.peers: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.stubs: Stubs | None = None
        (base / "kubelet").mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> Node:
        argv = [sys.executable, str(HERE / "node_main.py"), "--root", str(self.root), "--socket", str(self.socket),
                "--node-id", self.node_id, "--driver", self.driver, "--listen", self.address,
                "--cert", str(self.pki.cert), "--key", str(self.pki.key), "--ca", str(self.pki.ca)]
        for node, address in self.peers.items():
            argv += ["--peer", f"{node}={address}"]
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, env=env,
                                         start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if b"READY" not in line:
            self.proc.wait(10)
            raise RuntimeError(f"node {self.node_id} did not start: {self.log.read_text()[-3000:]}")
        self.stubs = connect(f"unix://{self.socket}")
        return self

    def kill(self) -> None:
        """kill -9, as a crash."""
        if self.stubs is not None:
            self.stubs.channel.close()
            self.stubs = None
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def stop(self) -> None:
        if self.stubs is not None:
            self.stubs.channel.close()
            self.stubs = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
            self.proc = None

    @property
    def controller(self):  # type: ignore[no-untyped-def]
        assert self.stubs is not None
        return self.stubs.controller

    @property
    def node(self):  # type: ignore[no-untyped-def]
        assert self.stubs is not None
        return self.stubs.node

    # ---------------------------------------------------------------- calls

    def create_volume(self, name: str, size: int = 64 * MiB, source: pb.VolumeContentSource | None = None,
                      **extra: object) -> pb.Volume:
        request = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                         volume_capabilities=[mount_cap()], volume_content_source=source,
                                         **extra)  # type: ignore[arg-type]
        return self.controller.CreateVolume(request, timeout=120).volume

    def create_until_done(self, name: str, source: pb.VolumeContentSource, size: int = 64 * MiB,
                          deadline: float = 300, **extra: object) -> tuple[pb.Volume, list[str]]:
        """Repeat CreateVolume as the provisioner does while it answers ABORTED; returns the
        volume and the ABORTED messages seen."""
        aborted: list[str] = []
        end = time.monotonic() + deadline
        while True:
            try:
                return self.create_volume(name, size, source, **extra), aborted
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > end:
                    raise
                aborted.append(exc.details())
                time.sleep(0.2)

    def snapshot(self, name: str, volume_id: str, **extra: object) -> pb.Snapshot:
        return self.controller.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id,
                                                                       **extra), timeout=120).snapshot  # type: ignore[arg-type]

    def mounted(self, volume_id: str, pod: str) -> Path:
        staging = self.base / "kubelet" / "plugins" / pod / "globalmount"
        target = self.base / "kubelet" / "pods" / pod / "mount"
        staging.parent.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging),
                                                            volume_capability=mount_cap()))
        self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=mount_cap()))
        return target

    def layers(self) -> list[str]:
        """Layer directories the driver holds (names only), read from its home."""
        home = self.root / self.driver
        found: set[str] = set()
        for sub in ("dir", "diff", "layers", "subvolumes", "snapshots", ""):
            d = home / sub if sub else home
            if d.is_dir():
                found |= {p.name for p in d.iterdir() if p.name.startswith(("oci", "vol-", "snap-", "base-"))}
        return sorted(found)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
