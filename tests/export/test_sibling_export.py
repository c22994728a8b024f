"""Sibling snapshots through the Diff export service, and the capacity of restored layers.

On vfs and btrfs (and devicemapper) two snapshots of one volume are siblings: both have the
volume's parent as parent. The export service accepts the older one as the base of the newer
one (same ``origin``, earlier ``created``), so ``strata backup push`` through the plugin's
socket is as incremental as in direct mode: the second backup moves about the change. Any other
non-ancestor base stays FAILED_PRECONDITION. Checked over a real unix socket with real drivers
(vfs, overlay, btrfs), with the real ``strata backup`` command, ``umoci`` (an unpacker nobody
here wrote) and strata's restore on a fresh node.

A restore creates its bottom layer with the artifact's capacity (on devicemapper a layer
without a size gets the pool's base size, too small for a bigger volume's data): checked on
vfs and btrfs, directly and through ImportDiff, with the driver's public size facilities
(``layer().size_bytes``, and on btrfs a write past the size failing).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from export_helpers import NODE  # isort: skip (puts backup_helpers on the path)
from backup_helpers import need, run, snapshot_tree, tree  # isort: skip
from test_backup_command import answer_of, strata  # isort: skip
from test_export_service import code_of  # isort: skip
from test_sibling_snapshots import BULK_FILES, CHUNK, ENVELOPE, fill_volume  # isort: skip

from csi.backup import VolumeFacts, backup, open_target, parse_reference
from csi.backup.index import ExportIndex
from csi.backup.media import LAYER_TAR
from csi.graphdriver.registry import home_of, new_driver
from csi.ops.backup import INDEX_NAME, restore_direct, restore_remote
from csi.proto import export_pb2 as pb, export_pb2_grpc
from csi.services.export import ExportBackend, start_unix_export
from csi.services.volume_ids import make_id

MiB = 1 << 20
VOL = "vol-" + "1" * 32
OTHER_VOL = "vol-" + "2" * 32
S1, S2, S3 = ("snap-" + c * 32 for c in "123")
OTHER = "snap-" + "4" * 32  # a snapshot of another volume


def sid(layer: str) -> str:
    return make_id(layer, NODE)


def _write(drv: object, layer: str, change: callable) -> None:  # type: ignore[valid-type]
    root = drv.get(layer)  # type: ignore[attr-defined]
    try:
        change(root)
    finally:
        drv.put(layer)  # type: ignore[attr-defined]


def _change(root: Path) -> None:
    """1 MiB of new data: a file added, one modified in place, one deleted, a directory deleted."""
    (root / "added").write_bytes(os.urandom(2 * CHUNK))
    with open(root / "bulk" / "f01", "r+b") as f:  # same size: only content tells
        f.write(os.urandom(CHUNK))
    (root / "bulk" / "f11").unlink()
    shutil.rmtree(root / "old-dir")
    (root / "new-dir").mkdir()
    (root / "new-dir" / "y").write_bytes(os.urandom(CHUNK))
    os.utime(root / "bulk", ns=(1_750_000_000_000_000_001,) * 2)


def make_siblings(drv: object) -> None:
    """VOL with 6 MiB, S1 of it, 1 MiB changed, S2 of it, a little more, S3; OTHER of OTHER_VOL."""
    drv.create(VOL)  # type: ignore[attr-defined]
    _write(drv, VOL, fill_volume)
    drv.freeze(VOL, S1)  # type: ignore[attr-defined]
    _write(drv, VOL, _change)
    drv.freeze(VOL, S2)  # type: ignore[attr-defined]
    _write(drv, VOL, lambda root: (root / "s3-only").write_bytes(b"three"))
    drv.freeze(VOL, S3)  # type: ignore[attr-defined]
    drv.create(OTHER_VOL)  # type: ignore[attr-defined]
    _write(drv, OTHER_VOL, fill_volume)
    drv.freeze(OTHER_VOL, OTHER)  # type: ignore[attr-defined]


@pytest.fixture(params=["vfs", "overlay", "btrfs"])
def node(request: pytest.FixtureRequest) -> Iterator[tuple[Path, object, Path]]:
    """(root, driver with the siblings, a directory on the same filesystem)."""
    base = request.getfixturevalue("btrfs_dir" if request.param == "btrfs" else "ext4_dir")
    root = base / "node-a"
    drv = new_driver(root, request.param).driver
    make_siblings(drv)
    yield root, drv, base
    drv.cleanup()


@pytest.fixture
def served(node: tuple[Path, object, Path]) -> Iterator[tuple[Path, object, Path, export_pb2_grpc.DiffExportStub]]:
    """The export service on ``<root>/export.sock`` with the node's export cache, as ``strata serve``."""
    root, drv, base = node
    backend = ExportBackend(drv, NODE, ExportIndex(home_of(root, drv.name) / INDEX_NAME))  # type: ignore[arg-type]
    server, endpoint = start_unix_export(backend, root / "export.sock")
    channel = grpc.insecure_channel(endpoint)
    try:
        yield root, drv, base, export_pb2_grpc.DiffExportStub(channel)
    finally:
        channel.close()
        server.stop(0).wait()


def _ref(snapshot: str) -> pb.SnapshotRef:
    return pb.SnapshotRef(snapshot_id=snapshot)


def _download(stub: export_pb2_grpc.DiffExportStub, snapshot: str, base: str,
              offset: int = 0) -> tuple[bytes, pb.ExportSummary]:
    messages = list(stub.ExportDiff(pb.ExportDiffRequest(snapshot=_ref(snapshot), base=base,
                                                         starting_offset=offset)))
    assert messages[-1].HasField("summary")
    return b"".join(m.data for m in messages), messages[-1].summary


def test_a_sibling_base_exports_about_the_change(served) -> None:
    root, drv, base, stub = served
    chain2 = stub.GetChain(pb.GetChainRequest(snapshot=_ref(sid(S2))))
    chain1 = stub.GetChain(pb.GetChainRequest(snapshot=_ref(sid(S1))))
    other = stub.GetChain(pb.GetChainRequest(snapshot=_ref(sid(OTHER))))
    assert chain2.layers[-1].origin == chain1.layers[-1].origin == sid(VOL)  # the volume's CSI handle
    assert other.layers[-1].origin == sid(OTHER_VOL)
    if drv.name != "overlay":  # siblings: S1 is not in S2's chain
        assert [l.id for l in chain2.layers] == [sid(S2)]

    data, summary = _download(stub, sid(S2), sid(S1))
    assert MiB <= len(data) < 2 * MiB, len(data)  # about the change, not the 6 MiB volume
    assert summary.diff_id == "sha256:" + hashlib.sha256(data).hexdigest() and summary.size == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
    assert "added" in names and "bulk/f01" in names and "new-dir/y" in names
    assert "bulk/.wh.f11" in names and ".wh.old-dir" in names and "bulk/f02" not in names
    # deterministic: the same bytes again, and a resume from the middle gives the rest
    again, _ = _download(stub, sid(S2), sid(S1))
    assert again == data
    tail, resumed = _download(stub, sid(S2), sid(S1), offset=len(data) // 2 + 7)
    assert tail == data[len(data) // 2 + 7:] and resumed.digest == summary.digest
    # Changes and DiffSize with the same base
    changes = {c.path: c.kind for m in stub.Changes(pb.ChangesRequest(snapshot=_ref(sid(S2)), base=sid(S1)))
               for c in m.changes}
    assert changes["/added"] == pb.Change.ADDED and changes["/bulk/f01"] == pb.Change.MODIFIED
    assert changes["/bulk/f11"] == pb.Change.DELETED and changes["/old-dir"] == pb.Change.DELETED
    assert "/bulk/f02" not in changes
    size = stub.DiffSize(pb.DiffSizeRequest(snapshot=_ref(sid(S2)), base=sid(S1))).size
    assert size == len(data)


def test_bases_that_are_not_offered(served) -> None:
    root, drv, base, stub = served

    def size(snapshot: str, base_id: str):  # type: ignore[no-untyped-def]
        return lambda: stub.DiffSize(pb.DiffSizeRequest(snapshot=_ref(snapshot), base=base_id))

    assert code_of(size(sid(S2), sid(OTHER))) == grpc.StatusCode.FAILED_PRECONDITION  # another volume
    assert code_of(size(sid(S1), sid(S2))) == grpc.StatusCode.FAILED_PRECONDITION  # a later snapshot
    assert code_of(size(sid(S2), sid(S2))) == grpc.StatusCode.FAILED_PRECONDITION  # itself
    assert code_of(lambda: stub.ExportDiff(pb.ExportDiffRequest(snapshot=_ref(sid(S1)), base=sid(S3)))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stub.Changes(pb.ChangesRequest(snapshot=_ref(sid(OTHER)), base=sid(S1)))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    # a writable layer (the volume itself) is no base either, and a deleted snapshot is NOT_FOUND
    assert code_of(size(sid(S2), VOL)) == grpc.StatusCode.FAILED_PRECONDITION
    drv.remove(S1)  # type: ignore[attr-defined]
    assert code_of(size(sid(S2), sid(S1))) == grpc.StatusCode.NOT_FOUND
    # an older sibling further back is still a base
    assert stub.DiffSize(pb.DiffSizeRequest(snapshot=_ref(sid(S3)), base=sid(S2))).size > 0


def test_backup_push_through_the_plugin_is_incremental_for_siblings(served) -> None:
    need("umoci")
    root, drv, base, stub = served
    layout = base / "layout"
    first = answer_of(strata("push", sid(S1), "--to", f"oci-layout:{layout}:s1", "--root", str(root)))
    second = answer_of(strata("push", sid(S2), "--to", f"oci-layout:{layout}:s2", "--root", str(root)))
    # the plugin diffed S2 against its sibling (its export cache says so)
    cache = ExportIndex(home_of(root, drv.name) / INDEX_NAME)
    assert cache.lookup(S2, S1, LAYER_TAR, drv.layer(S2).created) is not None
    drv.remove(S1)  # rotation: S2's backup is the base now
    third = answer_of(strata("push", sid(S3), "--to", f"oci-layout:{layout}:s3", "--root", str(root)))
    assert first["bytes_sent"] > BULK_FILES * CHUNK and first["blobs_sent"] == 1
    assert MiB <= second["bytes_sent"] < 2 * MiB + ENVELOPE, second["bytes_sent"]
    assert second["blobs_sent"] == 1 and second["layers"][0] == first["layers"][0]
    assert third["bytes_sent"] < 64 << 10 and third["blobs_sent"] == 1
    assert third["layers"][:2] == second["layers"]
    print(f"{drv.name}: through the plugin, full {first['bytes_sent']}, S2 {second['bytes_sent']}, "
          f"S3 {third['bytes_sent']} bytes sent")

    for tag, snap in (("s2", S2), ("s3", S3)):
        run("umoci", "raw", "unpack", "--image", f"{layout}:{tag}", str(base / f"u-{tag}"))
        assert tree(base / f"u-{tag}") == snapshot_tree(drv, snap)
    restored = answer_of(strata("restore", second["reference"], "--root", str(base / "node-b"), "--driver", "vfs"))
    target = new_driver(base / "node-b", "vfs").driver
    assert snapshot_tree(target, restored["layer"]) == snapshot_tree(drv, S2)


# ---------------------------------------------------------------------- capacity of restored layers

CAPACITY = 48 << 20


@pytest.fixture(params=["vfs", "btrfs"])
def capacity_node(request: pytest.FixtureRequest) -> Iterator[tuple[object, Path, str]]:
    """A driver with a 6 MiB snapshot S1 backed up to a layout with a capacity of 48 MiB;
    returns (driver, base directory, the backup's reference)."""
    base = request.getfixturevalue("btrfs_dir" if request.param == "btrfs" else "ext4_dir")
    drv = new_driver(base / "node-a", request.param).driver
    drv.create(VOL)
    _write(drv, VOL, fill_volume)
    drv.freeze(VOL, S1)
    target = open_target(parse_reference(f"oci-layout:{base / 'layout'}:s1"), create=True)
    result = backup(drv, S1, target, tag="s1", facts=VolumeFacts(capacity_bytes=CAPACITY, driver=drv.name))
    yield drv, base, result.reference
    drv.cleanup()


def _watch_imports(drv: object) -> list[tuple[str, str | None, int | None]]:
    """(layer, parent, its size as the driver reports it) of every layer a diff is applied to."""
    seen: list[tuple[str, str | None, int | None]] = []
    real = drv.apply_diff  # type: ignore[attr-defined]

    def watching(layer_id: str, parent: str | None, stream):  # type: ignore[no-untyped-def]
        seen.append((layer_id, parent, drv.layer(layer_id).size_bytes))  # type: ignore[attr-defined]
        return real(layer_id, parent, stream)

    drv.apply_diff = watching  # type: ignore[attr-defined]
    return seen


def _check_volume(drv: object, layer: str) -> None:
    """The restored volume has the capacity, and where the driver enforces sizes a write past it fails."""
    assert drv.layer(layer).size_bytes == CAPACITY  # type: ignore[attr-defined]
    if drv.size_enforcement().startswith("none"):  # type: ignore[attr-defined]
        return
    path = drv.get(layer)  # type: ignore[attr-defined]
    try:
        with pytest.raises(OSError) as info:
            with open(path / "too-big", "wb") as f:
                for _ in range(CAPACITY // MiB + 8):
                    f.write(b"\xab" * MiB)
                f.flush()
                os.fsync(f.fileno())
        assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        drv.put(layer)  # type: ignore[attr-defined]


def test_a_direct_restore_gives_the_bottom_layer_and_the_volume_the_capacity(capacity_node) -> None:
    drv, base, reference = capacity_node
    other_root = base / "node-b"
    other = new_driver(other_root, drv.name).driver  # type: ignore[attr-defined]
    try:
        seen = _watch_imports(other)
        out = restore_direct(other, other_root, reference, credentials=None, volume_name="pvc-r", node_id="node-b",
                             progress=lambda p: None)
        assert [(parent, size) for _, parent, size in seen] == [(None, CAPACITY)]
        volume = out["volume_id"].split("@", 1)[0]
        assert snapshot_tree(other, volume) == snapshot_tree(drv, S1)
        _check_volume(other, volume)
    finally:
        other.cleanup()


def test_import_diff_gives_the_bottom_layer_the_capacity(capacity_node) -> None:
    drv, base, reference = capacity_node
    other_root = base / "node-b"
    other = new_driver(other_root, drv.name).driver  # type: ignore[attr-defined]
    server, endpoint = start_unix_export(ExportBackend(other, "node-b"), other_root / "export.sock")
    try:
        seen = _watch_imports(other)
        with grpc.insecure_channel(endpoint) as channel:
            out = restore_remote(channel, None, reference, credentials=None, volume_name="",  # type: ignore[arg-type]
                                 progress=lambda p: None)
        assert [(parent, size) for _, parent, size in seen] == [(None, CAPACITY)]
        assert snapshot_tree(other, out["layer"]) == snapshot_tree(drv, S1)
    finally:
        server.stop(0).wait()
        other.cleanup()
