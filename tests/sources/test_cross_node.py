"""Restore and clone across nodes: a snapshot (or a volume) of node A as the content source of
a CreateVolume on node B, two real ``strata serve`` processes talking TLS (see conftest.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from layertree import assert_same_tree, mutate, populate, set_mtimes

from sources_support import Node

from csi.proto import csi_pb2 as pb
from csi.proto import export_pb2, export_pb2_grpc


def chain_length(node: Node, snapshot_id: str) -> int:
    """How many layers the owner's chain of ``snapshot_id`` has (its export socket)."""
    with grpc.insecure_channel(f"unix://{node.base / 'export.sock'}") as channel:
        return len(export_pb2_grpc.DiffExportStub(channel).GetChain(export_pb2.GetChainRequest(
            snapshot=export_pb2.SnapshotRef(snapshot_id=snapshot_id)), timeout=60).layers)


def snapshot_source(snapshot_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def volume_source(volume_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=volume_id))


def pulls(node: Node) -> list[tuple[int, int, int]]:
    """(imported, reused, bytes) of every pull the node logged."""
    return [(int(a), int(b), int(c)) for a, b, c in
            re.findall(r"pulled \S+ from .*?: (\d+) layer\(s\) imported, (\d+) reused, (\d+) bytes", node.log_text())]


def two_nodes(nodes: Callable[..., Node], driver: str, **env: str) -> tuple[Node, Node]:
    a, b = nodes("node-a", driver), nodes("node-b", driver, env)
    return a.start(), b.start()


def chain_on(a: Node) -> tuple[str, str, str, Path]:
    """A volume on A with two snapshots (a chain of two layers); returns (volume, snap1, snap2,
    the volume's mount)."""
    vol = a.create_volume("pvc-src").volume_id
    mount = a.mounted(vol, "pod-src")
    populate(mount)
    snap1 = a.snapshot("snap-1", vol).snapshot_id
    mutate(mount)
    set_mtimes(mount)
    snap2 = a.snapshot("snap-2", vol).snapshot_id
    return vol, snap1, snap2, mount


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_restore_and_clone_across_nodes(nodes: Callable[..., Node], driver: str) -> None:
    a, b = two_nodes(nodes, driver)
    vol, snap1, snap2, mount = chain_on(a)

    # the reference: the same snapshot restored on its own node
    local = a.create_volume("pvc-local", source=snapshot_source(snap2)).volume_id
    expected = a.mounted(local, "pod-local")

    restored, _ = b.create_until_done("pvc-restored", snapshot_source(snap2))
    assert restored.volume_id.endswith("@node-b")
    assert restored.content_source.snapshot.snapshot_id == snap2
    assert restored.volume_context["strata.csi.dev/restored-from"] == "node node-a"
    assert_same_tree(expected, b.mounted(restored.volume_id, "pod-restored"))
    first, layers = pulls(b), chain_length(a, snap2)
    assert first and first[-1][:2] == (layers, 0) and first[-1][2] > 0, first  # the whole chain moved

    # a second restore of the same snapshot moves nothing, and an older one of the chain neither
    again, aborted = b.create_until_done("pvc-again", snapshot_source(snap2))
    assert not aborted
    assert pulls(b)[-1] == (0, layers, 0), pulls(b)
    assert_same_tree(expected, b.mounted(again.volume_id, "pod-again"))
    older, _ = b.create_until_done("pvc-older", snapshot_source(snap1))
    older_layers = chain_length(a, snap1)
    assert pulls(b)[-1][:2] in ((0, older_layers), (older_layers, 0)), pulls(b)  # shared layers reused
    older_expected = a.mounted(a.create_volume("pvc-older-local", source=snapshot_source(snap1)).volume_id, "pod-ol")
    assert_same_tree(older_expected, b.mounted(older.volume_id, "pod-older"))

    # the repeated call answers the same volume
    assert b.create_volume("pvc-restored", source=snapshot_source(snap2)).volume_id == restored.volume_id

    # clone of A's live volume on B: A freezes it, B pulls what it lacks (only the new layer)
    (mount / "after-snapshots.txt").write_text("written after the last snapshot\n")
    clone, _ = b.create_until_done("pvc-clone", volume_source(vol))
    assert clone.content_source.volume.volume_id == vol
    assert pulls(b)[-1][0] >= 1, pulls(b)
    assert_same_tree(mount, b.mounted(clone.volume_id, "pod-clone"))
    # the helper snapshot on A is gone once the clone exists
    listed = a.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries
    assert sorted(e.snapshot.snapshot_id for e in listed) == sorted([snap1, snap2])


def test_unknown_snapshot_of_a_peer_is_not_found(nodes: Callable[..., Node]) -> None:
    a, b = two_nodes(nodes, "vfs")
    missing = "snap-" + "0" * 32 + "@node-a"
    with pytest.raises(grpc.RpcError) as err:
        b.create_until_done("pvc-x", snapshot_source(missing))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "node-a" in err.value.details()
    assert not [l for l in b.layers() if l.startswith(("vol-", "ocitmp-"))]
