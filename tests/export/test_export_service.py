"""The Diff export service over a real unix socket, on vfs, overlay and btrfs.

Every call goes through real gRPC (``start_unix_export``: the one error seam, the RPC log) to a
real driver on a real filesystem; expected values are computed independently from the driver
contract (``driver.diff`` hashed here, ``driver.changes``, ``driver.diff_size``) and, for
ImportDiff, by comparing the imported tree with the source snapshot's tree byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.errors import Busy
import zstandard

from export_helpers import BIG, NODE, OTHER, SNAP0, SNAP1, Export, driver_digest  # isort: skip (puts backup_helpers on the path)
from backup_helpers import snapshot_tree  # isort: skip

from csi.backup.index import ExportIndex, is_temporary
from csi.backup.media import LAYER_TAR, LAYER_TAR_ZSTD, chain_id
from csi.graphdriver.registry import new_driver
from csi.proto import export_pb2 as pb, export_pb2_grpc
from csi.services.export import CHUNK, ExportBackend, start_unix_export


def ref(snapshot_id: str) -> pb.SnapshotRef:
    return pb.SnapshotRef(snapshot_id=snapshot_id)


def download(stub: export_pb2_grpc.DiffExportStub, snapshot: str, base: str = "", offset: int = 0,
             compression: int = pb.NONE) -> tuple[bytes, pb.ExportSummary, list[pb.ExportDiffResponse]]:
    messages = list(stub.ExportDiff(pb.ExportDiffRequest(snapshot=ref(snapshot), base=base, starting_offset=offset,
                                                         compression=compression)))
    data = b"".join(m.data for m in messages)
    assert messages[-1].HasField("summary") and not messages[-1].data
    assert all(not m.HasField("summary") for m in messages[:-1])
    return data, messages[-1].summary, messages


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()  # type: ignore[operator]
        if isinstance(result, Iterator):
            list(result)
    return info.value.code()


def test_socket_is_owner_only(export: Export) -> None:
    mode = os.stat(export.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_get_chain_lists_ancestors_with_their_digests_and_caches_them(export: Export) -> None:
    drv = export.backend.driver
    answer = export.stub.GetChain(pb.GetChainRequest(snapshot=ref(export.sid(SNAP1))))
    assert answer.driver == drv.name and answer.node_id == NODE
    assert [l.id for l in answer.layers] == [export.sid(SNAP0), export.sid(SNAP1)]
    assert [l.parent for l in answer.layers] == ["", export.sid(SNAP0)]
    d0, n0 = driver_digest(drv, SNAP0, None)
    d1, n1 = driver_digest(drv, SNAP1, SNAP0)
    assert [l.digest for l in answer.layers] == [d0, d1]
    assert [l.tar_size for l in answer.layers] == [n0, n1]
    assert [l.size for l in answer.layers] == [drv.diff_size(SNAP0, None), drv.diff_size(SNAP1, SNAP0)]
    assert [l.chain_id for l in answer.layers] == [chain_id([d0]), chain_id([d0, d1])]
    assert answer.layers[1].size >= BIG
    # the digests are in the export cache now: a second call walks no data
    calls: list[tuple[str, str | None]] = []
    real = drv.diff

    def counting(layer: str, base: str | None = None):  # type: ignore[no-untyped-def]
        calls.append((layer, base))
        return real(layer, base)

    drv.diff = counting  # type: ignore[method-assign]
    try:
        again = export.stub.GetChain(pb.GetChainRequest(snapshot=ref(export.sid(SNAP1))))
    finally:
        del drv.diff
    assert again == answer and calls == []
    rec = ExportIndex(export.socket.parent / "backup-index.json").lookup(SNAP1, SNAP0, LAYER_TAR,
                                                                        drv.layer(SNAP1).created)
    assert rec is not None and rec.diff_id == d1 and rec.size == n1


def test_export_is_deterministic_resumable_and_verifiable(export: Export) -> None:
    drv = export.backend.driver
    sid1, sid0 = export.sid(SNAP1), export.sid(SNAP0)
    full, summary, messages = download(export.stub, sid1, sid0)
    diff_id, tar_size = driver_digest(drv, SNAP1, SNAP0)
    assert summary.media_type == LAYER_TAR
    assert summary.diff_id == summary.digest == diff_id == "sha256:" + hashlib.sha256(full).hexdigest()
    assert summary.size == summary.uncompressed_size == summary.bytes_sent == len(full) == tar_size
    assert len(messages) >= 4 and all(len(m.data) == CHUNK for m in messages[:-2])
    assert [m.offset for m in messages[:-1]] == [i * CHUNK for i in range(len(messages) - 1)]
    # progress: bytes done grow to the total
    dones = [m.bytes_done for m in messages]
    assert dones == sorted(dones) and dones[-1] == tar_size and messages[-1].bytes_total == tar_size
    assert download(export.stub, sid1, sid0)[0] == full  # two exports are identical
    for offset in (1, CHUNK - 1, CHUNK, CHUNK + 7, len(full) // 2, len(full) - 1, len(full)):
        part, s, msgs = download(export.stub, sid1, sid0, offset)
        assert part == full[offset:], offset
        assert (s.digest, s.size, s.bytes_sent) == (diff_id, len(full), len(full) - offset)
        if part:
            assert msgs[0].offset == offset
    assert code_of(lambda: download(export.stub, sid1, sid0, len(full) + 1)) == grpc.StatusCode.OUT_OF_RANGE


def test_zstd_export_is_deterministic_and_resumes_in_the_compressed_stream(export: Export) -> None:
    sid1, sid0 = export.sid(SNAP1), export.sid(SNAP0)
    blob, summary, _ = download(export.stub, sid1, sid0, compression=pb.ZSTD)
    tar, _, _ = download(export.stub, sid1, sid0)
    assert summary.media_type == LAYER_TAR_ZSTD
    assert summary.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and summary.size == len(blob)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == tar
    assert summary.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() and summary.uncompressed_size == len(tar)
    assert download(export.stub, sid1, sid0, compression=pb.ZSTD)[0] == blob
    for offset in (1, len(blob) // 3, len(blob) - 1):
        part, s, _ = download(export.stub, sid1, sid0, offset, pb.ZSTD)
        assert part == blob[offset:] and s.digest == summary.digest


def test_full_export_without_base_and_the_other_calls(export: Export) -> None:
    drv = export.backend.driver
    sid1, sid0 = export.sid(SNAP1), export.sid(SNAP0)
    full, summary, _ = download(export.stub, sid1)
    assert summary.diff_id == driver_digest(drv, SNAP1, None)[0]
    assert export.stub.DiffSize(pb.DiffSizeRequest(snapshot=ref(sid1), base=sid0)).size == drv.diff_size(SNAP1, SNAP0)
    assert export.stub.DiffSize(pb.DiffSizeRequest(snapshot=ref(sid1))).size == drv.diff_size(SNAP1, None)
    streamed = [(c.path, c.kind) for m in export.stub.Changes(pb.ChangesRequest(snapshot=ref(sid1), base=sid0))
                for c in m.changes]
    expected = [(c.path, {"added": pb.Change.ADDED, "modified": pb.Change.MODIFIED,
                          "deleted": pb.Change.DELETED}[c.kind.value]) for c in drv.changes(SNAP1, SNAP0)]
    assert streamed == expected
    kinds = dict(streamed)
    assert kinds["/remove-me"] == pb.Change.DELETED
    assert kinds["/big"] == pb.Change.ADDED
    assert kinds["/etc/config"] == pb.Change.MODIFIED


def test_bad_names_and_bases(export: Export) -> None:
    stub, sid1, sid0 = export.stub, export.sid(SNAP1), export.sid(SNAP0)
    size = lambda snapshot, base="": lambda: stub.DiffSize(pb.DiffSizeRequest(snapshot=ref(snapshot), base=base))  # noqa: E731
    assert code_of(size("")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(size(SNAP1.replace("a", "f") + "@elsewhere")) == grpc.StatusCode.NOT_FOUND  # another node's
    assert code_of(size("snap-" + "9" * 32 + "@" + NODE)) == grpc.StatusCode.NOT_FOUND  # never existed
    assert code_of(size("vol-" + "1" * 32 + "@" + NODE)) == grpc.StatusCode.INVALID_ARGUMENT  # a volume
    assert code_of(size("vol-b")) == grpc.StatusCode.INVALID_ARGUMENT  # a writable layer
    assert code_of(size("../etc/passwd")) == grpc.StatusCode.NOT_FOUND
    # a base that is not an ancestor: another volume's snapshot, the snapshot itself, a descendant
    assert code_of(size(sid1, export.sid(OTHER))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(size(sid1, sid1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(size(sid0, sid1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(size(sid1, "snap-" + "9" * 32 + "@" + NODE)) == grpc.StatusCode.NOT_FOUND
    export_call = lambda: download(stub, sid1, export.sid(OTHER))  # noqa: E731
    assert code_of(export_call) == grpc.StatusCode.FAILED_PRECONDITION
    changes = lambda: stub.Changes(pb.ChangesRequest(snapshot=ref(sid0), base=sid1))  # noqa: E731
    assert code_of(changes) == grpc.StatusCode.FAILED_PRECONDITION
    # a deleted snapshot that still has children is hidden: no longer a base, nor exported
    export.backend.driver.remove(SNAP0)
    assert code_of(size(sid1, sid0)) == grpc.StatusCode.NOT_FOUND
    assert code_of(size(sid0)) == grpc.StatusCode.NOT_FOUND
    chain = stub.GetChain(pb.GetChainRequest(snapshot=ref(sid1)))
    assert [l.id for l in chain.layers] == [sid1]  # the hidden ancestor is folded into the top's diff


def _import_requests(header: pb.ImportHeader, blob: bytes, piece: int = 300_000) -> Iterator[pb.ImportDiffRequest]:
    yield pb.ImportDiffRequest(header=header)
    for i in range(0, len(blob), piece):
        yield pb.ImportDiffRequest(data=blob[i:i + piece])


@pytest.fixture
def target(driver: object, tmp_path: Path) -> Iterator[tuple[object, export_pb2_grpc.DiffExportStub]]:
    """A second node (same driver kind, its own root) with its own export socket."""
    home = Path(driver.home).parent.parent / "target-root"  # type: ignore[attr-defined]
    drv = new_driver(home, driver.name).driver  # type: ignore[attr-defined]
    backend = ExportBackend(drv, "node-b", ExportIndex(tmp_path / "target-index.json"))
    server, endpoint = start_unix_export(backend, tmp_path / "target.sock")
    channel = grpc.insecure_channel(endpoint)
    try:
        yield drv, export_pb2_grpc.DiffExportStub(channel)
    finally:
        channel.close()
        server.stop(0).wait()
        drv.cleanup()


def test_import_rebuilds_the_chain_byte_for_byte(export: Export, target: tuple) -> None:
    drv, stub = target
    chain = export.stub.GetChain(pb.GetChainRequest(snapshot=ref(export.sid(SNAP1)))).layers
    parent = ""
    made = []
    for entry, compression, media in zip(chain, (pb.ZSTD, pb.NONE), (LAYER_TAR_ZSTD, LAYER_TAR)):
        blob, summary, _ = download(export.stub, entry.id, entry.parent, compression=compression)
        header = pb.ImportHeader(parent=parent, diff_id=entry.digest, media_type=media, digest=summary.digest)
        probe = lambda: stub.ImportDiff(iter([pb.ImportDiffRequest(header=header)]))  # noqa: E731
        assert code_of(probe) == grpc.StatusCode.NOT_FOUND  # a header-only call asks; nothing is made
        answer = stub.ImportDiff(_import_requests(header, blob))
        assert probe().existed
        assert not answer.existed and answer.diff_id == entry.digest
        assert answer.chain_id == entry.chain_id  # the same ChainID on both nodes
        assert answer.layer_id == "oci-" + entry.chain_id.split(":")[1] and answer.size == entry.tar_size
        parent = answer.layer_id
        made.append(answer.layer_id)
        assert drv.layer(answer.layer_id).frozen
    assert snapshot_tree(drv, made[0]) == snapshot_tree(export.backend.driver, SNAP0)
    assert snapshot_tree(drv, made[1]) == snapshot_tree(export.backend.driver, SNAP1)
    # the imported chain lists the same digests (recorded at import: nothing re-hashed)
    again = stub.GetChain(pb.GetChainRequest(snapshot=ref(made[1])))
    assert [l.digest for l in again.layers] == [l.digest for l in chain]
    assert [l.chain_id for l in again.layers] == [l.chain_id for l in chain]
    # a layer the node has is answered at once
    blob, summary, _ = download(export.stub, chain[1].id, chain[1].parent)
    answer = stub.ImportDiff(_import_requests(pb.ImportHeader(parent=made[0], diff_id=chain[1].digest), blob))
    assert answer.existed and answer.layer_id == made[1] and answer.size == 0
    assert not [l.id for l in drv.layers() if is_temporary(l.id)]


def test_import_with_a_wrong_digest_leaves_nothing(export: Export, target: tuple) -> None:
    drv, stub = target
    before = sorted(l.id for l in drv.layers())
    blob, summary, _ = download(export.stub, export.sid(SNAP0))
    wrong = "sha256:" + "ab" * 32
    assert code_of(lambda: stub.ImportDiff(_import_requests(pb.ImportHeader(diff_id=wrong), blob))) \
        == grpc.StatusCode.DATA_LOSS
    # right diff_id, wrong blob digest; then a corrupted byte
    bad_blob_digest = pb.ImportHeader(diff_id=summary.diff_id, digest=wrong)
    assert code_of(lambda: stub.ImportDiff(_import_requests(bad_blob_digest, blob))) == grpc.StatusCode.DATA_LOSS
    corrupt = bytearray(blob)
    corrupt[len(corrupt) // 2] ^= 0xFF
    code = code_of(lambda: stub.ImportDiff(_import_requests(pb.ImportHeader(diff_id=summary.diff_id), bytes(corrupt))))
    assert code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INVALID_ARGUMENT)
    # malformed requests
    no_header = iter([pb.ImportDiffRequest(data=b"x")])
    assert code_of(lambda: stub.ImportDiff(no_header)) == grpc.StatusCode.INVALID_ARGUMENT
    bad_digest = pb.ImportHeader(diff_id="sha256:nothex")
    assert code_of(lambda: stub.ImportDiff(_import_requests(bad_digest, blob))) == grpc.StatusCode.INVALID_ARGUMENT
    bad_media = pb.ImportHeader(diff_id=summary.diff_id, media_type="text/plain")
    assert code_of(lambda: stub.ImportDiff(_import_requests(bad_media, blob))) == grpc.StatusCode.INVALID_ARGUMENT
    no_parent = pb.ImportHeader(parent="oci-" + "c" * 64, diff_id=summary.diff_id)
    assert code_of(lambda: stub.ImportDiff(_import_requests(no_parent, blob))) == grpc.StatusCode.NOT_FOUND
    assert sorted(l.id for l in drv.layers()) == before
    # and the right one then works
    assert not stub.ImportDiff(_import_requests(pb.ImportHeader(diff_id=summary.diff_id), blob)).existed


def test_unexpected_failure_is_internal_and_the_stream_ends(export: Export) -> None:
    """A driver failure in the middle of a stream ends it with a status, never a hang."""
    drv = export.backend.driver

    def broken(layer: str, base: str | None = None):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk on fire")

    drv.diff = broken  # type: ignore[method-assign]
    try:
        assert code_of(lambda: download(export.stub, export.sid(SNAP0))) == grpc.StatusCode.INTERNAL
    finally:
        del drv.diff


def test_a_cancelled_export_releases_the_layers(export: Export) -> None:
    """A client that goes away mid-stream stops the diff: its producer thread ends, no mount
    reference is left behind, and the next export (resumed where the client stopped) completes."""
    drv = export.backend.driver
    # a diff larger than every buffer between the producer and the client (pipe, read-ahead,
    # gRPC's window), so the producer is still running when the client goes away
    top = "snap-" + "0" * 31 + "d"
    drv.create("vol-d", SNAP1)  # type: ignore[attr-defined]
    (drv.get("vol-d") / "large").write_bytes(os.urandom(32 << 20))  # type: ignore[attr-defined]
    drv.put("vol-d")  # type: ignore[attr-defined]
    drv.freeze("vol-d", top)  # type: ignore[attr-defined]
    sid1, sid0 = export.sid(top), export.sid(SNAP1)

    def producers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("diff-") and t.is_alive()]

    call = export.stub.ExportDiff(pb.ExportDiffRequest(snapshot=ref(sid1), base=sid0))
    first = next(call)
    assert len(first.data) == CHUNK
    assert producers()  # the diff is still being produced (the stream is several MiB)
    if drv.name != "overlay":  # overlay's native diff reads the upper dir without mounting anything
        # the stream reads through views: in use (not removable), yet never a recorded reference
        assert drv.references(top) + drv.references(SNAP1) == 0
        with pytest.raises(Busy):
            drv.remove(top)
    call.cancel()

    def removable() -> bool:
        return all(not drv._views.get(layer) for layer in (top, SNAP1))  # type: ignore[attr-defined]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (producers() or not removable()):
        time.sleep(0.05)
    assert producers() == [] and removable()
    assert drv.references(top) == 0 and drv.references(SNAP1) == 0
    rest, summary, _ = download(export.stub, sid1, sid0, CHUNK)
    assert "sha256:" + hashlib.sha256(first.data + rest).hexdigest() == summary.digest
