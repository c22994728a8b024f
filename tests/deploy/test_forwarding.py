"""Expansion forwarding end to end, with real processes on this machine.

A real ``strata serve`` node plugin (vfs under a scratch directory, node ID ``localhost``)
with its forward listener on 127.0.0.1, and real ``strata controller`` processes on unix
sockets; a gRPC client plays external-resizer. The controller is told where the node
listens with ``--node-address`` (there is no API server here to read the Node's
InternalIP from; that lookup is tested in test_nodelabel.py against recorded responses).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi.services.forwarder import TOKEN_HEADER
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc

NODE = "localhost"
MiB = 1 << 20
RWO = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_channel(target: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> grpc.Channel:
    channel = grpc.insecure_channel(target)
    deadline = time.monotonic() + timeout
    while True:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
            return channel
        except grpc.FutureTimeoutError:
            if proc.poll() is not None:
                raise AssertionError(f"process exited with {proc.returncode}: {proc.args}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} not ready after {timeout}s") from None


def strata(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "csi.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Cluster:
    base: Path
    node: rpc.ControllerStub
    forward_address: str
    token: str

    def controller(self, name: str, token: str, *table: str) -> tuple[subprocess.Popen[bytes], grpc.Channel]:
        token_file = self.base / f"{name}.token"
        token_file.write_text(token + "\n")
        sock = self.base / f"{name}.sock"
        args = ["controller", f"--endpoint=unix://{sock}", f"--forward-token-file={token_file}",
                "--driver-name=strata.csi.dev", "--timeout=20"]
        args += [f"--node-address={entry}" for entry in table]
        proc = strata(*args, log=self.base / f"{name}.log")
        return proc, wait_channel(f"unix://{sock}", proc)

    def create_volume(self, name: str, size: int = MiB) -> pb.Volume:
        cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                                  access_mode=pb.VolumeCapability.AccessMode(mode=RWO))
        request = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                         volume_capabilities=[cap])
        return self.node.CreateVolume(request).volume

    def capacity(self, volume_id: str) -> int:
        return self.node.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id)).volume.capacity_bytes


@pytest.fixture(scope="module")
def cluster(scratch_root: Path) -> Iterator[Cluster]:
    base = scratch_root / f"forwarding-{secrets.token_hex(4)}"
    base.mkdir()
    token = secrets.token_hex(24)
    (base / "node.token").write_text(token)
    forward = f"127.0.0.1:{free_port()}"
    node = strata("serve", f"--endpoint=unix://{base}/node.sock", f"--node-id={NODE}", f"--root={base}/root",
                  "--driver=vfs", f"--forward-listen={forward}", f"--forward-token-file={base}/node.token",
                  log=base / "node.log")
    try:
        channel = wait_channel(f"unix://{base}/node.sock", node)
        wait_channel(forward, node).close()
        yield Cluster(base, rpc.ControllerStub(channel), forward, token)
        channel.close()
    finally:
        stop(node)


@pytest.fixture(scope="module")
def controller(cluster: Cluster) -> Iterator[grpc.Channel]:
    proc, channel = cluster.controller("good", cluster.token, f"{NODE}={cluster.forward_address}")
    yield channel
    channel.close()
    stop(proc)


def expand(channel: grpc.Channel, volume_id: str, size: int) -> pb.ControllerExpandVolumeResponse:
    request = pb.ControllerExpandVolumeRequest(volume_id=volume_id,
                                               capacity_range=pb.CapacityRange(required_bytes=size))
    return rpc.ControllerStub(channel).ControllerExpandVolume(request, timeout=30)


def test_controller_identity_is_an_expansion_only_controller(controller: grpc.Channel) -> None:
    identity = rpc.IdentityStub(controller)
    assert identity.GetPluginInfo(pb.GetPluginInfoRequest()).name == "strata.csi.dev"
    caps = identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert pb.PluginCapability.Service.CONTROLLER_SERVICE in [c.service.type for c in caps if c.HasField("service")]
    assert [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")] == \
        [pb.PluginCapability.VolumeExpansion.ONLINE]
    ctl = rpc.ControllerStub(controller)
    rpcs = [c.rpc.type for c in ctl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities]
    assert rpcs == [pb.ControllerServiceCapability.RPC.EXPAND_VOLUME]
    with pytest.raises(grpc.RpcError) as err:
        ctl.CreateVolume(pb.CreateVolumeRequest(name="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_expansion_reaches_the_owner_node(cluster: Cluster, controller: grpc.Channel) -> None:
    volume = cluster.create_volume("pvc-grow")
    assert volume.volume_id.endswith(f"@{NODE}")
    assert cluster.capacity(volume.volume_id) == MiB
    response = expand(controller, volume.volume_id, 8 * MiB)
    assert response.capacity_bytes == 8 * MiB
    assert not response.node_expansion_required
    assert cluster.capacity(volume.volume_id) == 8 * MiB
    # Idempotent: asking for less than it has keeps the larger size.
    assert expand(controller, volume.volume_id, 4 * MiB).capacity_bytes == 8 * MiB
    assert cluster.capacity(volume.volume_id) == 8 * MiB


def test_wrong_token_is_unauthenticated_and_changes_nothing(cluster: Cluster) -> None:
    volume = cluster.create_volume("pvc-wrong-token")
    proc, channel = cluster.controller("bad", secrets.token_hex(24), f"{NODE}={cluster.forward_address}")
    try:
        with pytest.raises(grpc.RpcError) as err:
            expand(channel, volume.volume_id, 16 * MiB)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
        stop(proc)
    assert cluster.capacity(volume.volume_id) == MiB


def test_listener_refuses_missing_token_and_offers_only_expansion(cluster: Cluster) -> None:
    volume = cluster.create_volume("pvc-no-token")
    with grpc.insecure_channel(cluster.forward_address) as channel:
        stub = rpc.ControllerStub(channel)
        request = pb.ControllerExpandVolumeRequest(volume_id=volume.volume_id,
                                                   capacity_range=pb.CapacityRange(required_bytes=16 * MiB))
        with pytest.raises(grpc.RpcError) as err:
            stub.ControllerExpandVolume(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.ControllerExpandVolume(request, timeout=10, metadata=((TOKEN_HEADER, ""),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # With the right token, nothing but expansion is served on this port.
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=10,
                              metadata=((TOKEN_HEADER, cluster.token),))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert cluster.capacity(volume.volume_id) == MiB


def test_unknown_owner_node_is_not_found(controller: grpc.Channel) -> None:
    for volume_id in (f"vol-{'a' * 32}@node-elsewhere", "../../etc@localhost", "pvc-123"):
        with pytest.raises(grpc.RpcError) as err:
            expand(controller, volume_id, 2 * MiB)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, volume_id


def test_owner_answers_not_found_for_a_volume_it_does_not_hold(controller: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        expand(controller, f"vol-{'b' * 32}@{NODE}", 2 * MiB)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert NODE in (err.value.details() or "")


def test_unreachable_node_is_unavailable(cluster: Cluster) -> None:
    volume = cluster.create_volume("pvc-unreachable")
    proc, channel = cluster.controller("dead", cluster.token, f"{NODE}=127.0.0.1:{free_port()}")
    try:
        with pytest.raises(grpc.RpcError) as err:
            expand(channel, volume.volume_id, 2 * MiB)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        stop(proc)
    assert cluster.capacity(volume.volume_id) == MiB


def test_controller_refuses_to_start_without_a_usable_token(cluster: Cluster) -> None:
    short = cluster.base / "short.token"
    short.write_text("abc")
    done = subprocess.run([sys.executable, "-m", "csi.cli", "controller", f"--endpoint=unix://{cluster.base}/s.sock",
                           f"--forward-token-file={short}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "shorter than 16" in done.stderr
    assert not (cluster.base / "s.sock").exists()


def test_node_refuses_to_start_with_a_bad_forward_listener(cluster: Cluster) -> None:
    """`strata serve` stops with a clear message, and leaves no socket, when the listener cannot start."""
    cases = {
        "missing-token": (f"127.0.0.1:{free_port()}", str(cluster.base / "no-such.token"), "cannot read"),
        "bad-address": ("unix:///tmp/x.sock", str(cluster.base / "node.token"), "HOST:PORT"),
    }
    for name, (listen, token_file, message) in cases.items():
        sock = cluster.base / f"{name}.sock"
        done = subprocess.run([sys.executable, "-m", "csi.cli", "serve", f"--endpoint=unix://{sock}",
                               f"--root={cluster.base}/{name}-root", "--driver=vfs", f"--forward-listen={listen}",
                               f"--forward-token-file={token_file}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
        assert not sock.exists(), name
