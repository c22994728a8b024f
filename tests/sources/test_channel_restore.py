"""Cross-node restore over the real node-to-node channel: ``strata serve`` processes as built
for a cluster (``--peer-listen`` with TLS and ServiceAccount tokens checked by TokenReview,
``--tls-ca``/``--token-file`` to dial the others, Node addresses from the API), each in its own
network namespace (tests/peers: ``netns``, ``kube_standin``, ``peer_pki``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from layertree import assert_same_tree, populate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from kube_standin import KubeStandIn  # noqa: E402
from netns import Network, bind_in  # noqa: E402
from peer_pki import PEER_NAME, make_pki  # noqa: E402

from csi_harness import mount_cap  # noqa: E402
from test_cross_node import pulls, snapshot_source, volume_source  # noqa: E402

from csi.proto import csi_pb2 as pb  # noqa: E402
from csi.proto import csi_pb2_grpc as rpc  # noqa: E402

PORT = 9839
MiB = 1 << 20
NODE_SA = "strata/strata-node"


@dataclass
class ServedNode:
    name: str
    base: Path
    channel: grpc.Channel
    lane: bool = True  # serves a bulk lane

    @property
    def controller(self) -> rpc.ControllerStub:
        return rpc.ControllerStub(self.channel)

    @property
    def node(self) -> rpc.NodeStub:
        return rpc.NodeStub(self.channel)

    def log_text(self) -> str:
        return (self.base / "serve.log").read_text(errors="replace")

    def mounted(self, volume_id: str, pod: str) -> Path:
        staging, target = self.base / "kubelet" / pod / "staging", self.base / "kubelet" / pod / "target"
        staging.parent.mkdir(parents=True, exist_ok=True)
        self.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging),
                                                            volume_capability=mount_cap()))
        self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=mount_cap()))
        return target

    def create(self, name: str, source: pb.VolumeContentSource, deadline: float = 300) -> pb.Volume:
        end = time.monotonic() + deadline
        while True:
            try:
                return self.controller.CreateVolume(pb.CreateVolumeRequest(
                    name=name, capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
                    volume_capabilities=[mount_cap()], volume_content_source=source), timeout=120).volume
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > end:
                    raise
                time.sleep(0.2)


@pytest.fixture(params=["bulk-lane", "no-lane"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path, scratch_root: Path) -> Iterator[dict[str, ServedNode]]:
    """Two nodes; with ``no-lane`` node A serves no bulk lane (``--bulk-port=-1``), so B reads
    the layers through ExportDiff on the channel."""
    import shutil

    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("iproute2 (ip) and util-linux (nsenter) are needed for network namespaces")
    roots = scratch_root / f"sources-channel-{tmp_path.name}"
    roots.mkdir()
    net = Network()
    kube = None
    served: dict[str, ServedNode] = {}
    try:
        kube = KubeStandIn.start(bind_in(net.hub, net.hub_ip))
        pki = make_pki(tmp_path / "pki")
        token = tmp_path / "node.token"
        token.write_text(kube.token(NODE_SA) + "\n")
        for name in ("node-a", "node-b"):
            host = net.add(name)
            kube.nodes[name] = host.ip
            base = roots / name
            base.mkdir()
            sock = base / "csi.sock"
            argv = [sys.executable, "-m", "csi.cli", "serve", f"--endpoint=unix://{sock}", f"--node-id={name}",
                    f"--root={base / 'root'}", "--driver=vfs", f"--peer-listen={host.ip}:{PORT}",
                    f"--tls-cert={pki.cert}", f"--tls-key={pki.key}", "--peer-audience=strata-peer",
                    f"--peer-account={NODE_SA}", f"--tls-ca={pki.ca}", f"--token-file={token}",
                    f"--peer-server-name={PEER_NAME}", "--log-level=info"]
            if request.param == "no-lane" and name == "node-a":
                argv.append("--bulk-port=-1")
            proc = host.popen(argv, env=kube.env(tmp_path / "kubeconfig"), log=base / "serve.log")
            channel = grpc.insecure_channel(f"unix://{sock}")
            end = time.monotonic() + 60
            while True:
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.5)
                    break
                except grpc.FutureTimeoutError:
                    assert proc.poll() is None and time.monotonic() < end, (base / "serve.log").read_text()[-3000:]
            served[name] = ServedNode(name, base, channel, "--bulk-port=-1" not in argv)
        yield served
    finally:
        for node in served.values():
            node.channel.close()
        net.close()
        if kube is not None:
            kube.stop()
        from csi.host import mount as mnt

        for mp in mnt.mounts_under(roots):
            mnt.unmount(mp.target, detach=True)


def test_restore_over_the_authenticated_channel(cluster: dict[str, ServedNode]) -> None:
    a, b = cluster["node-a"], cluster["node-b"]
    vol = a.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-src", capacity_range=pb.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_cap()])).volume.volume_id
    mount = a.mounted(vol, "pod-src")
    populate(mount)
    snap = a.controller.CreateSnapshot(pb.CreateSnapshotRequest(name="snap-1", source_volume_id=vol)).snapshot
    # A digests the new snapshot in the background (--digest-snapshots is on with --peer-listen)
    layer = snap.snapshot_id.partition("@")[0]
    deadline = time.monotonic() + 60
    while not any(layer in p.read_text() for p in (a.base / "root").rglob("backup-index.json")):
        assert time.monotonic() < deadline, "node-a never digested its new snapshot"
        time.sleep(0.1)
    expected = a.mounted(a.create("pvc-local", snapshot_source(snap.snapshot_id)).volume_id, "pod-local")

    restored = b.create("pvc-restored", snapshot_source(snap.snapshot_id))
    assert restored.volume_id.endswith("@node-b")
    assert_same_tree(expected, b.mounted(restored.volume_id, "pod-restored"))
    assert pulls(b)[-1][0] >= 1  # type: ignore[arg-type]
    fell_back = "has no bulk lane" in (b.base / "serve.log").read_text(errors="replace")
    assert fell_back == (not a.lane), "B did not read A's layers the way A serves them"
    again = b.create("pvc-again", snapshot_source(snap.snapshot_id))
    assert pulls(b)[-1][0] == 0 and pulls(b)[-1][2] == 0, pulls(b)  # type: ignore[arg-type]
    assert_same_tree(expected, b.mounted(again.volume_id, "pod-again"))

    # a clone of A's volume: A's Controller freezes it over the channel, B pulls, A's snapshot goes
    before = {s.snapshot.snapshot_id for s in a.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries}
    clone = b.create("pvc-clone", volume_source(vol))
    assert_same_tree(mount, b.mounted(clone.volume_id, "pod-clone"))
    after = {s.snapshot.snapshot_id for s in a.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries}
    assert after == before, "the snapshot the clone took on node-a was left behind"
