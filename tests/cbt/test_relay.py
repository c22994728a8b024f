"""``strata controller``'s SnapshotMetadata relay (RelayingSnapshotMetadata): each call
streamed from the node that owns the snapshot, over a dialer (here a stand-in handing out
plain channels to in-process node servers on unix sockets; the real one is the TLS peer
channel of csi.peers.dial)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from csi.errors import Unavailable
from csi.ids import new_layer_id
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.services.listen import listen_unix, new_server
from csi.services.snapshot_metadata import RelayingSnapshotMetadata, SnapshotMetadataService, peer_service
from csi.services.volume_ids import make_id

from .test_snapshot_metadata import BLOCK, NODE, Harness, offsets

C = grpc.StatusCode


class Dialer:
    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints, self.dials, self.forgotten = endpoints, [], []
        self._channels: dict[str, grpc.Channel] = {}

    def dial(self, node_id: str) -> grpc.Channel:
        self.dials.append(node_id)
        if node_id not in self.endpoints:
            raise Unavailable(f"node {node_id} has no known address")
        if node_id not in self._channels:
            self._channels[node_id] = grpc.insecure_channel(self.endpoints[node_id])
        return self._channels[node_id]

    def forget(self, node_id: str) -> None:
        self.forgotten.append(node_id)
        channel = self._channels.pop(node_id, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


class BreaksMidStream(SnapshotMetadataService):
    def GetMetadataAllocated(self, request, context):  # type: ignore[no-untyped-def]
        stream = super().GetMetadataAllocated(request, context)
        yield next(stream)
        raise Unavailable("the pool went away")


class Relay:
    def __init__(self, root: Path, node: Harness) -> None:
        self.node = node
        # the node's peer listener carries the same service (peer_service), here on a socket
        self.peer = new_server(2, "peer")
        _prefix, add = peer_service(node.plugin)
        assert _prefix == "/csi.v1.SnapshotMetadata/"
        add(self.peer)
        self.broken = new_server(2, "broken")
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(BreaksMidStream(node.plugin), self.broken)
        endpoints = {NODE: listen_unix(self.peer, root / "peer.sock"),
                     "node-broken": listen_unix(self.broken, root / "broken.sock"),
                     "node-down": f"unix://{root / 'nobody.sock'}"}
        self.peer.start()
        self.broken.start()
        self.dialer = Dialer(endpoints)
        self.server = new_server(2, "relay")
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(RelayingSnapshotMetadata(self.dialer, timeout=30), self.server)
        endpoint = listen_unix(self.server, root / "controller.sock")
        self.server.start()
        self.channel = grpc.insecure_channel(endpoint)
        self.meta = csi_pb2_grpc.SnapshotMetadataStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.dialer.close()
        for server in (self.server, self.peer, self.broken):
            server.stop(0)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    node = Harness(tmp_path / "node")
    node.canned()
    r = Relay(tmp_path, node)
    yield r
    r.close()
    node.close()


def fail(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def test_relayed_streams_are_the_nodes_answers(relay: Relay) -> None:
    h = relay.node
    got = list(relay.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=h.sid("s1"), max_results=2)))
    assert [len(r.block_metadata) for r in got] == [2, 2, 1]
    assert offsets(got) == [b * BLOCK for b in (0, 5, 6, 7, 20)]
    got = list(relay.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=h.sid("s1"), target_snapshot_id=h.sid("s2"), starting_offset=7 * BLOCK)))
    assert offsets(got) == [b * BLOCK for b in (20, 30, 31)]
    assert relay.dialer.dials == [NODE, NODE] and not relay.dialer.forgotten


def test_errors_relayed_or_answered_here(relay: Relay) -> None:
    h = relay.node
    err = fail(lambda: list(relay.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=make_id(new_layer_id("snap-"), NODE)))))
    assert err.code() == C.NOT_FOUND and f"node {NODE}" in err.details()  # the node's answer, relayed
    err = fail(lambda: list(relay.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=h.sid("s1"), target_snapshot_id=h.sid("lonely")))))
    assert err.code() == C.FAILED_PRECONDITION
    dials = len(relay.dialer.dials)
    assert fail(lambda: list(relay.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id="not-strata")))).code() == C.NOT_FOUND  # malformed: answered here, nothing dialed
    assert fail(lambda: list(relay.meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=h.sid("s1"))))).code() == C.INVALID_ARGUMENT
    assert len(relay.dialer.dials) == dials


def test_unreachable_owner_is_unavailable_naming_it(relay: Relay) -> None:
    snap = make_id(relay.node.layers["s1"], "node-down")
    err = fail(lambda: list(relay.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snap))))
    assert err.code() == C.UNAVAILABLE and "node-down" in err.details()
    assert relay.dialer.dials == ["node-down", "node-down"]  # looked up again once
    assert relay.dialer.forgotten == ["node-down", "node-down"]
    err = fail(lambda: list(relay.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=make_id(relay.node.layers["s1"], "node-unknown")))))
    assert err.code() == C.UNAVAILABLE and "node-unknown" in err.details()


def test_failure_mid_stream_is_relayed_not_retried(relay: Relay) -> None:
    snap = make_id(relay.node.layers["s1"], "node-broken")
    stream = relay.meta.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=snap, max_results=1))
    # the stand-in node only knows snapshots of NODE: its plugin answers NOT_FOUND first
    err = fail(lambda: list(stream))
    assert err.code() == C.NOT_FOUND
    relay.node.plugin.config = replace(relay.node.plugin.config, node_id="node-broken")  # now it owns the ID
    received = []
    err = fail(lambda: received.extend(relay.meta.GetMetadataAllocated(
        pb.GetMetadataAllocatedRequest(snapshot_id=snap, max_results=1))))
    assert len(received) == 1 and err.code() == C.UNAVAILABLE and "the pool went away" in err.details()
    assert relay.dialer.dials.count("node-broken") == 2 and not relay.dialer.forgotten  # one dial per call
