"""Transfers that take time: ABORTED while pending (one pull only), kill -9 of the target or
of the source mid-transfer, the owner gone (UNAVAILABLE naming it)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from layertree import assert_same_tree

from sources_support import MiB, Node
from test_cross_node import snapshot_source

from csi.proto import csi_pb2 as pb

BIG_FILES = 6
BIG_FILE = 32 * MiB


def big_snapshot(a: Node) -> tuple[str, Path]:
    """A snapshot of ~192 MiB of incompressible data on A; returns it and the volume's mount."""
    vol = a.create_volume("pvc-big", size=512 * MiB).volume_id
    mount = a.mounted(vol, "pod-big")
    for i in range(BIG_FILES):
        with open(mount / f"blob-{i}", "wb") as f:
            for _ in range(BIG_FILE // MiB):
                f.write(os.urandom(MiB))
    (mount / "small").write_text("small file\n")
    return a.snapshot("snap-big", vol).snapshot_id, mount


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def importing(node: Node) -> bool:
    return any(l.startswith("ocitmp-") for l in node.layers())


def test_repeated_create_is_aborted_while_the_pull_runs(nodes: Callable[..., Node]) -> None:
    a = nodes("node-a", "vfs")
    b = nodes("node-b", "vfs", {"STRATA_TRANSFER_WAIT_SECONDS": "0.2"})
    a.start(), b.start()
    snap, mount = big_snapshot(a)
    volume, aborted = b.create_until_done("pvc-copy", snapshot_source(snap), size=512 * MiB)
    assert aborted, "the pull never outlasted the call"
    assert all("still being pulled from node node-a" in m and "operation pending" in m for m in aborted), aborted
    assert b.log_text().count(f"pulling {snap} from node node-a in the background") == 1
    assert_same_tree(mount, b.mounted(volume.volume_id, "pod-copy"))


def test_kill_target_mid_transfer(nodes: Callable[..., Node]) -> None:
    a = nodes("node-a", "vfs")
    b = nodes("node-b", "vfs", {"STRATA_TRANSFER_WAIT_SECONDS": "0"})
    a.start(), b.start()
    snap, mount = big_snapshot(a)
    with pytest.raises(grpc.RpcError) as err:
        b.create_volume("pvc-copy", size=512 * MiB, source=snapshot_source(snap))
    assert err.value.code() == grpc.StatusCode.ABORTED
    wait_for(lambda: importing(b), "an import in progress on node-b")
    b.kill()
    b.env.pop("STRATA_TRANSFER_WAIT_SECONDS")
    b.start()
    # nothing half-imported is visible, nothing leaked: no temporary layer, no volume layer
    assert not [l for l in b.layers() if l.startswith(("ocitmp-", "vol-"))], b.layers()
    assert "rolling back the pull of" in b.log_text()
    volume, _ = b.create_until_done("pvc-copy", snapshot_source(snap), size=512 * MiB)
    assert_same_tree(mount, b.mounted(volume.volume_id, "pod-copy"))
    assert len([l for l in b.layers() if l.startswith("vol-")]) == 1


def test_kill_source_mid_transfer(nodes: Callable[..., Node]) -> None:
    a = nodes("node-a", "vfs")
    b = nodes("node-b", "vfs", {"STRATA_TRANSFER_WAIT_SECONDS": "0"})
    a.start(), b.start()
    snap, mount = big_snapshot(a)
    with pytest.raises(grpc.RpcError):
        b.create_volume("pvc-copy", size=512 * MiB, source=snapshot_source(snap))
    wait_for(lambda: importing(b), "an import in progress on node-b")
    a.kill()
    with pytest.raises(grpc.RpcError) as err:
        b.create_until_done("pvc-copy", snapshot_source(snap), size=512 * MiB, deadline=120)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert "node-a" in err.value.details()
    wait_for(lambda: not importing(b), "the half import on node-b to be removed", timeout=10)
    assert not [l for l in b.layers() if l.startswith("vol-")]
    a.start()
    volume, _ = b.create_until_done("pvc-copy", snapshot_source(snap), size=512 * MiB)
    expected = a.mounted(a.create_volume("pvc-local", size=512 * MiB, source=snapshot_source(snap)).volume_id, "pl")
    assert_same_tree(expected, b.mounted(volume.volume_id, "pod-copy"))


def test_owner_gone_is_unavailable_naming_it(nodes: Callable[..., Node]) -> None:
    a, b = nodes("node-a", "vfs"), nodes("node-b", "vfs")
    a.start(), b.start()
    vol = a.create_volume("pvc-src").volume_id
    (a.mounted(vol, "pod-src") / "f").write_text("x")
    snap = a.snapshot("snap-1", vol).snapshot_id
    a.stop()
    with pytest.raises(grpc.RpcError) as err:
        b.create_until_done("pvc-copy", snapshot_source(snap))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "node node-a" in err.value.details() and snap in err.value.details()
    assert not [l for l in b.layers() if l.startswith(("vol-", "ocitmp-"))]


def test_snapshot_deleted_on_the_owner_while_pulled(nodes: Callable[..., Node]) -> None:
    """The pull completes (the owner kept the layer long enough) or is rolled back (NOT_FOUND
    after): never a corrupt or half-imported volume."""
    a = nodes("node-a", "vfs")
    b = nodes("node-b", "vfs", {"STRATA_TRANSFER_WAIT_SECONDS": "0"})
    a.start(), b.start()
    snap, mount = big_snapshot(a)
    with pytest.raises(grpc.RpcError):
        b.create_volume("pvc-copy", size=512 * MiB, source=snapshot_source(snap))
    wait_for(lambda: importing(b), "an import in progress on node-b")
    try:
        a.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap))
        deleted = True
    except grpc.RpcError as exc:  # the owner refuses while its export holds the layer: nothing changed
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "in use" in exc.details(), exc
        listed = a.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap)).entries
        assert [e.snapshot.snapshot_id for e in listed] == [snap], "a refused delete must leave the snapshot"
        deleted = False
    try:
        volume, _ = b.create_until_done("pvc-copy", snapshot_source(snap), size=512 * MiB)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE), exc
        wait_for(lambda: not importing(b), "the half import on node-b to be removed", timeout=10)
        assert not [l for l in b.layers() if l.startswith("vol-")]
    else:
        assert_same_tree(mount, b.mounted(volume.volume_id, "pod-copy"))
    assert not importing(b)
    if not deleted:  # the retried delete goes through once the pull is over
        a.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap))
        assert not a.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap)).entries
