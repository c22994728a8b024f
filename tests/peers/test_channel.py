"""The node-to-node channel end to end: real ``strata serve`` nodes and a real ``strata controller``,
each in its own network namespace with its own address (``netns.Network``), certificates made by
the test (``peer_pki``), clients run as processes inside a namespace (``peer_client.py``).

There is no API server here: the Kubernetes API (TokenReview, SubjectAccessReview, Node
InternalIP lookups) is a local HTTP stand-in with recorded answers (``kube_standin.py``),
listening inside the test network, which the strata processes find through KUBECONFIG. The
kubernetes client, gRPC, TLS, the drivers (vfs) and the processes are real.

Accounts: ``strata/strata-node`` (every node's token), ``strata/strata-controller`` (the
controller's), ``backup/agent`` (a backup tool, granted ``get`` on one VolumeSnapshot),
``default/intruder`` (authenticated, not strata's).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from kube_standin import KubeStandIn
from netns import Host, Network, bind_in, stop
from peer_pki import PEER_NAME, Pki, make_pki

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc
from csi.proto import export_pb2, export_pb2_grpc
from csi.services.volume_ids import make_id

PORT = 9839
MiB = 1 << 20
NODE_SA, CONTROLLER_SA = "strata/strata-node", "strata/strata-controller"
AGENT = "system:serviceaccount:backup:agent"
CLIENT = Path(__file__).parent / "peer_client.py"
RWO = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
MOUNT = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                            access_mode=pb.VolumeCapability.AccessMode(mode=RWO))


def wait_unix(path: Path, proc: object, timeout: float = 60) -> grpc.Channel:
    channel = grpc.insecure_channel(f"unix://{path}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            grpc.channel_ready_future(channel).result(timeout=0.5)
            return channel
        except grpc.FutureTimeoutError:
            if proc.poll() is not None:  # type: ignore[attr-defined]
                raise AssertionError(f"process exited with {proc.returncode}: {proc.args}") from None  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} not ready after {timeout}s") from None


@dataclass
class Node:
    host: Host
    root: Path
    sock: Path
    proc: object = None
    channel: grpc.Channel | None = None

    @property
    def controller(self) -> rpc.ControllerStub:
        return rpc.ControllerStub(self.channel)

    @property
    def node(self) -> rpc.NodeStub:
        return rpc.NodeStub(self.channel)


@dataclass
class Cluster:
    base: Path
    net: Network
    kube: KubeStandIn
    pki: Pki
    nodes: dict[str, Node] = field(default_factory=dict)
    tokens: dict[str, Path] = field(default_factory=dict)
    ctl_sock: Path | None = None

    def token_file(self, name: str, token: str) -> Path:
        path = self.base / f"{name}.token"
        path.write_text(token + "\n")
        self.tokens[name] = path
        return path

    def serve(self, name: str, listen_ip: str | None = None) -> Node:
        node = self.nodes.get(name) or Node(self.net.hosts[name], self.base / name / "root", self.base / name / "csi.sock")
        node.sock.parent.mkdir(parents=True, exist_ok=True)
        ip = listen_ip or node.host.ip
        argv = [sys.executable, "-m", "csi.cli", "serve", f"--endpoint=unix://{node.sock}", f"--node-id={name}",
                f"--root={node.root}", "--driver=vfs", f"--peer-listen={ip}:{PORT}", f"--tls-cert={self.pki.cert}",
                f"--tls-key={self.pki.key}", "--peer-audience=strata-peer", f"--peer-account={NODE_SA}",
                f"--controller-account={CONTROLLER_SA}", f"--tls-ca={self.pki.ca}",
                f"--token-file={self.tokens['node']}", f"--peer-server-name={PEER_NAME}"]
        node.proc = node.host.popen(argv, env=self.kube.env(self.base / "kubeconfig"), log=self.base / f"{name}.log")
        node.channel = wait_unix(node.sock, node.proc)
        self.nodes[name] = node
        self.kube.nodes[name] = ip
        return node

    def client(self, host: Host, call: str, *args: str, token: str | None = "node", plain: bool = False,
               ca: Path | None = None, address: str | None = None) -> dict:
        argv = [sys.executable, str(CLIENT), address or f"{self.net.hosts['node-a'].ip}:{PORT}",
                f"--ca={ca or self.pki.ca}", f"--server-name={PEER_NAME}"]
        if token is not None:
            argv.append(f"--token-file={self.tokens[token]}")
        if plain:
            argv.append("--plain")
        done = host.run([*argv, call, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, scratch_root: Path) -> Iterator[Cluster]:
    base = Path(tmp_path_factory.mktemp("channel"))
    roots = scratch_root / f"channel-{base.name}"  # the layers live on the root filesystem, not tmpfs
    net = Network()
    kube = None
    try:
        kube = KubeStandIn.start(bind_in(net.hub, net.hub_ip))
        c = Cluster(roots, net, kube, make_pki(base / "pki"))
        roots.mkdir()
        c.token_file("node", kube.token(NODE_SA))
        c.token_file("controller", kube.token(CONTROLLER_SA))
        c.token_file("agent", kube.token("backup/agent"))
        c.token_file("intruder", kube.token("default/intruder"))
        c.token_file("wrong-audience", kube.token(NODE_SA, audiences=("https://kubernetes.default.svc",)))
        c.token_file("bogus", "eyJhbGciOiJSUzI1NiJ9.not-a-token-the-api-knows.sig")
        for name in ("node-a", "node-b", "node-c", "ctl"):
            net.add(name)
        c.serve("node-a")
        c.serve("node-b")
        kube.nodes["node-c"] = net.hosts["node-c"].ip  # a Node whose plugin does not run
        yield c
    finally:
        net.close()
        if kube is not None:
            kube.stop()


@pytest.fixture(scope="module")
def snapshot_a(cluster: Cluster) -> str:
    """A snapshot on node A with a file in it (written through NodeStage's mount)."""
    a = cluster.nodes["node-a"]
    volume = a.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-src", capacity_range=pb.CapacityRange(required_bytes=8 * MiB), volume_capabilities=[MOUNT])).volume
    staging = cluster.base / "staging-a"
    staging.mkdir()
    a.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=str(staging),
                                                     volume_capability=MOUNT))
    (staging / "hello.txt").write_bytes(b"hello from node-a\n" * 1000)
    a.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume.volume_id,
                                                         staging_target_path=str(staging)))
    snap = a.controller.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-src"))
    assert snap.snapshot.snapshot_id.endswith("@node-a")
    return snap.snapshot.snapshot_id


def b(cluster: Cluster) -> Host:
    return cluster.net.hosts["node-b"]


# ---------------------------------------------------------------------------- Diff export between nodes


def test_node_b_reads_node_a_snapshot_over_the_channel(cluster: Cluster, snapshot_a: str) -> None:
    chain = cluster.client(b(cluster), "chain", snapshot_a)
    assert chain["code"] == "OK", chain
    assert chain["result"]["node"] == "node-a" and chain["result"]["driver"] == "vfs"
    assert chain["result"]["layers"][-1] == snapshot_a
    exported = cluster.client(b(cluster), "export", snapshot_a)
    assert exported["code"] == "OK", exported
    result = exported["result"]
    assert result["bytes"] > 18000 and result["sha256"] == result["summary_digest"]
    # the same bytes as node A's own export socket gives
    with grpc.insecure_channel(f"unix://{cluster.nodes['node-a'].sock.with_name('export.sock')}") as local:
        blob = b"".join(m.data for m in export_pb2_grpc.DiffExportStub(local).ExportDiff(
            export_pb2.ExportDiffRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=snapshot_a)), timeout=60))
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == result["sha256"]
    # B's token was reviewed for the channel's audience
    reviews = [r.body for r in cluster.kube.seen("POST", "/tokenreviews")]
    node_token = cluster.tokens["node"].read_text().strip()
    assert any(r["spec"]["token"] == node_token and r["spec"]["audiences"] == ["strata-peer"] for r in reviews)
    # a peer may ask whether a layer is here (ImportDiff header-only): NOT_FOUND, not a refusal
    probe = cluster.client(b(cluster), "import-probe", "", "sha256:" + "0" * 64)
    assert probe["code"] == "NOT_FOUND", probe


def test_another_node_snapshot_is_not_found_on_this_one(cluster: Cluster, snapshot_a: str) -> None:
    other = cluster.client(b(cluster), "chain", snapshot_a, address=f"{b(cluster).ip}:{PORT}")
    assert other["code"] == "NOT_FOUND" and "node-a" in other["details"], other


@pytest.mark.parametrize("token", ["bogus", "wrong-audience", None])
def test_bad_missing_or_wrong_audience_token_is_unauthenticated(cluster: Cluster, snapshot_a: str,
                                                                token: str | None) -> None:
    volume = cluster.nodes["node-a"].controller.CreateVolume(pb.CreateVolumeRequest(
        name=f"pvc-tok-{token}", capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capabilities=[MOUNT])).volume
    for call in (("chain", snapshot_a), ("expand", volume.volume_id, str(4 * MiB))):
        answer = cluster.client(b(cluster), *call, token=token)
        assert answer["code"] == "UNAUTHENTICATED", (token, call, answer)
        if token is not None:  # the token never appears in an answer
            assert cluster.tokens[token].read_text().strip() not in answer["details"]
    if token == "wrong-audience":
        assert "audience" in answer["details"]
    got = cluster.nodes["node-a"].controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
        volume_id=volume.volume_id)).volume.capacity_bytes
    assert got == MiB


def test_accounts_that_are_not_strata_are_permission_denied(cluster: Cluster, snapshot_a: str) -> None:
    volume = cluster.nodes["node-a"].controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-intruder", capacity_range=pb.CapacityRange(required_bytes=MiB),
        volume_capabilities=[MOUNT])).volume
    for token in ("intruder", "agent"):
        expand = cluster.client(b(cluster), "expand", volume.volume_id, str(4 * MiB), token=token)
        assert expand["code"] == "PERMISSION_DENIED", (token, expand)
        probe = cluster.client(b(cluster), "import-probe", "", "sha256:" + "0" * 64, token=token)
        assert probe["code"] == "PERMISSION_DENIED", (token, probe)
    # not a peer: a bare snapshot handle cannot be authorized; a VolumeSnapshot it may not get is refused
    assert cluster.client(b(cluster), "chain", snapshot_a, token="intruder")["code"] == "INVALID_ARGUMENT"
    denied = cluster.client(b(cluster), "chain-vs", "apps", "daily", token="intruder")
    assert denied["code"] == "PERMISSION_DENIED", denied
    # the controller's account may call the forwarded Controller calls, but is no Diff export peer
    assert cluster.client(b(cluster), "import-probe", "", "sha256:" + "0" * 64,
                          token="controller")["code"] == "PERMISSION_DENIED"
    got = cluster.nodes["node-a"].controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
        volume_id=volume.volume_id)).volume.capacity_bytes
    assert got == MiB


def test_a_backup_agent_reads_the_volume_snapshot_it_may_get(cluster: Cluster, snapshot_a: str) -> None:
    """The Diff export service keeps its per-VolumeSnapshot authorization on the shared listener."""
    content = "snapcontent-2f0a1b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b"
    cluster.kube.objects["/apis/snapshot.storage.k8s.io/v1/namespaces/apps/volumesnapshots/daily"] = {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "daily", "namespace": "apps"}, "status": {"boundVolumeSnapshotContentName": content}}
    cluster.kube.objects[f"/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/{content}"] = {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent", "metadata": {"name": content},
        "spec": {"driver": "strata.csi.dev", "volumeSnapshotRef": {"namespace": "apps", "name": "daily"}},
        "status": {"snapshotHandle": snapshot_a}}
    assert cluster.client(b(cluster), "chain-vs", "apps", "daily", token="agent")["code"] == "PERMISSION_DENIED"
    cluster.kube.grant(AGENT, "get", "snapshot.storage.k8s.io", "volumesnapshots", "apps", "daily")
    allowed = cluster.client(b(cluster), "chain-vs", "apps", "daily", token="agent")
    assert allowed["code"] == "OK" and allowed["result"]["layers"][-1] == snapshot_a, allowed


def test_plain_tcp_and_an_untrusted_certificate_are_refused(cluster: Cluster, snapshot_a: str) -> None:
    plain = cluster.client(b(cluster), "chain", snapshot_a, plain=True)
    assert plain["code"] == "UNAVAILABLE", plain
    other_ca = make_pki(cluster.base / "other-pki")
    untrusted = cluster.client(b(cluster), "chain", snapshot_a, ca=other_ca.ca)
    assert untrusted["code"] == "UNAVAILABLE", untrusted
    # the control: the same call with the right CA and token works
    assert cluster.client(b(cluster), "chain", snapshot_a)["code"] == "OK"


# ---------------------------------------------------------------------------- the bulk lane


def test_the_bulk_lane_carries_what_export_diff_carries(cluster: Cluster, snapshot_a: str) -> None:
    """OpenExport over the channel, then the bytes on the lane's own TLS socket: the same blob
    and summary as ExportDiff on the channel."""
    exported = cluster.client(b(cluster), "export", snapshot_a)
    fetched = cluster.client(b(cluster), "bulk", snapshot_a)
    assert fetched["code"] == "OK", fetched
    assert fetched["result"] == exported["result"]
    assert fetched["result"]["sha256"] == fetched["result"]["summary_digest"]


def test_a_bulk_ticket_is_used_once_and_only_the_channel_issues_one(cluster: Cluster, snapshot_a: str) -> None:
    twice = cluster.client(b(cluster), "bulk-twice", snapshot_a)
    assert twice["code"] == "OK", twice
    assert twice["result"]["first"]["bytes"] > 18000
    assert twice["result"]["error"] == "PermissionDenied" and "ticket" in twice["result"]["message"]
    forged = cluster.client(b(cluster), "bulk-forged", snapshot_a)
    assert forged["result"]["error"] == "PermissionDenied", forged
    # OpenExport is a Diff export call: the channel's tokens and per-request rules decide
    for token, code in (("bogus", "UNAUTHENTICATED"), (None, "UNAUTHENTICATED"), ("intruder", "INVALID_ARGUMENT")):
        refused = cluster.client(b(cluster), "bulk", snapshot_a, token=token)
        assert refused["code"] == code, (token, refused)
    # a ticket sent in the clear gets no data: the lane speaks TLS only
    plain = cluster.client(b(cluster), "bulk-plain", snapshot_a)
    assert plain["code"] == "OK" and plain["result"]["data_frame"] is False, plain
    # the tickets never reach the owner's log (neither redeemed nor refused)
    for answer in (twice, forged):
        assert answer["result"]["ticket"] not in cluster.log("node-a")


# ---------------------------------------------------------------------------- strata controller


@pytest.fixture(scope="module")
def controller(cluster: Cluster) -> Iterator[grpc.Channel]:
    host = cluster.net.hosts["ctl"]
    sock = cluster.base / "ctl" / "csi.sock"
    sock.parent.mkdir()
    proc = host.popen([sys.executable, "-m", "csi.cli", "controller", f"--endpoint=unix://{sock}",
                       f"--tls-ca={cluster.pki.ca}", f"--token-file={cluster.tokens['controller']}",
                       f"--peer-port={PORT}", f"--peer-server-name={PEER_NAME}", "--timeout=20"],
                      env=cluster.kube.env(cluster.base / "kubeconfig"), log=cluster.base / "ctl.log")
    channel = wait_unix(sock, proc)
    yield channel
    channel.close()
    stop(proc)


def expand(channel: grpc.Channel, volume_id: str, size: int) -> pb.ControllerExpandVolumeResponse:
    return rpc.ControllerStub(channel).ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)), timeout=60)


def error_of(fn: object, *args: object, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value


def test_controller_is_an_expand_and_modify_controller(controller: grpc.Channel) -> None:
    ctl = rpc.ControllerStub(controller)
    rpcs = [c.rpc.type for c in ctl.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities]
    assert rpcs == [pb.ControllerServiceCapability.RPC.EXPAND_VOLUME, pb.ControllerServiceCapability.RPC.MODIFY_VOLUME]
    assert error_of(ctl.CreateVolume, pb.CreateVolumeRequest(name="x")).code() == grpc.StatusCode.UNIMPLEMENTED


def test_controller_forwards_expansion_to_the_owning_node(cluster: Cluster, controller: grpc.Channel) -> None:
    node_b = cluster.nodes["node-b"]
    volume = node_b.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-grow", capacity_range=pb.CapacityRange(required_bytes=MiB), volume_capabilities=[MOUNT])).volume
    assert volume.volume_id.endswith("@node-b")
    assert expand(controller, volume.volume_id, 8 * MiB).capacity_bytes == 8 * MiB
    assert node_b.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
        volume_id=volume.volume_id)).volume.capacity_bytes == 8 * MiB
    # it went over the channel: node-b's InternalIP was looked up, the controller's token reviewed
    assert cluster.kube.seen("GET", "/api/v1/nodes/node-b")
    token = cluster.tokens["controller"].read_text().strip()
    assert any(r.body["spec"]["token"] == token for r in cluster.kube.seen("POST", "/tokenreviews"))
    # the owner's own answers are relayed, naming the node
    missing = error_of(expand, controller, make_id("vol-" + "b" * 32, "node-b"), 2 * MiB)
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "node-b" in missing.details()


def test_controller_forwards_modify_volume(cluster: Cluster, controller: grpc.Channel) -> None:
    node_a = cluster.nodes["node-a"]
    volume = node_a.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-modify", capacity_range=pb.CapacityRange(required_bytes=MiB), volume_capabilities=[MOUNT])).volume
    ctl = rpc.ControllerStub(controller)
    # vfs has no mutable properties: the owner's INVALID_ARGUMENT naming its driver comes back
    err = error_of(ctl.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id=volume.volume_id, mutable_parameters={"compression": "zstd"}), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "node-a" in err.details() and "vfs" in err.details(), err.details()
    assert "ControllerModifyVolume" in cluster.log("node-a")
    # a volume of no node strata knows answers from the owner: NOT_FOUND
    err = error_of(ctl.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
        volume_id=make_id("vol-" + "c" * 32, "node-a"), mutable_parameters={"compression": "zstd"}), timeout=60)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_unreachable_or_unknown_owner_is_unavailable_naming_the_node(cluster: Cluster,
                                                                     controller: grpc.Channel) -> None:
    for node in ("node-c", "node-gone"):  # a Node whose plugin does not answer; a Node the API does not know
        err = error_of(expand, controller, make_id("vol-" + "d" * 32, node), 2 * MiB)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (node, err)
        assert node in err.details(), err.details()
    for volume_id in ("pvc-123", "../../etc@node-a"):  # not strata's IDs: unknown objects
        assert error_of(expand, controller, volume_id, 2 * MiB).code() == grpc.StatusCode.NOT_FOUND


def test_controller_forgets_a_moved_node_and_finds_it_again(cluster: Cluster, controller: grpc.Channel) -> None:
    """Node A restarts on another address: the cached address fails, the controller forgets it,
    reads the Node again and reaches the new address — within the same call."""
    node_a = cluster.nodes["node-a"]
    volume = node_a.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-moving", capacity_range=pb.CapacityRange(required_bytes=MiB), volume_capabilities=[MOUNT])).volume
    assert expand(controller, volume.volume_id, 2 * MiB).capacity_bytes == 2 * MiB  # caches node-a's address
    lookups = len(cluster.kube.seen("GET", "/api/v1/nodes/node-a"))
    node_a.channel.close()
    stop(node_a.proc)
    moved = "10.213.0.11"
    node_a.host.add_address(moved)
    cluster.serve("node-a", listen_ip=moved)  # nothing listens on the old address any more
    assert cluster.kube.nodes["node-a"] == moved
    assert expand(controller, volume.volume_id, 4 * MiB).capacity_bytes == 4 * MiB
    assert len(cluster.kube.seen("GET", "/api/v1/nodes/node-a")) == lookups + 1
    assert cluster.nodes["node-a"].controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
        volume_id=volume.volume_id)).volume.capacity_bytes == 4 * MiB


def test_controller_relays_snapshot_metadata_to_the_owner(cluster: Cluster, controller: grpc.Channel,
                                                          snapshot_a: str) -> None:
    """strata controller (where the external-snapshot-metadata sidecar runs) advertises SnapshotMetadata
    and relays each call to the node owning the snapshot over the channel, answers naming that node."""
    caps = rpc.IdentityStub(controller).GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert pb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in {c.service.type for c in caps}
    meta = rpc.SnapshotMetadataStub(controller)
    err = error_of(lambda: list(meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snapshot_a))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "node-a" in err.details(), err.details()
    err = error_of(lambda: list(meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=snapshot_a, target_snapshot_id=snapshot_a))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and ("vfs" in err.details() or "overlay" in err.details())
    missing = make_id("snap-" + "c" * 32, "node-a")
    err = error_of(lambda: list(meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=missing))))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "node-a" in err.details()
    err = error_of(lambda: list(meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=make_id("snap-" + "c" * 32, "node-gone")))))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "node-gone" in err.details()
