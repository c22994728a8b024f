"""The pieces under the services: ID parsing, the error seam, secret redaction in logs,
the state store's transactions, the per-key locks, concurrency over the socket."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from csi_harness import Harness, MiB, code_of, mount_cap

from csi import errors
from csi.proto import csi_pb2 as pb
from csi.services import volume_ids
from csi.services.locks import KeyLocks
from csi.services.rpclog import logged_ids, redacted
from csi.services.status import status_of
from csi.state.store import RecordState, StateStore, VolumeRecord

LAYER = "vol-0123456789abcdef0123456789abcdef"


def test_volume_ids_round_trip_and_refuse_anything_else() -> None:
    vid = volume_ids.make_id(LAYER, "node-a.example")
    assert vid == LAYER + "@node-a.example"
    assert volume_ids.parse_id(vid) == (LAYER, "node-a.example")
    assert volume_ids.owner_node(vid) == "node-a.example"
    for bad in ["", "../etc@node", LAYER, LAYER + "@", LAYER + "@../x", LAYER + "@a/b", "vol-XYZ@n",
                LAYER.upper() + "@n", LAYER + "@n\0", "snap-0123@n", None, 42, LAYER + "@" + "n" * 91]:
        with pytest.raises(errors.NotFound):
            volume_ids.parse_id(bad)
    with pytest.raises(errors.NotFound):
        volume_ids.parse_local(vid, "node-b", volume_ids.VOLUME_PREFIX)
    with pytest.raises(errors.NotFound):
        volume_ids.parse_local(vid, "node-a.example", volume_ids.SNAPSHOT_PREFIX)
    with pytest.raises(errors.InvalidArgument):
        volume_ids.check_node_id("bad/node")


def test_error_seam_maps_each_type() -> None:
    expected = {
        errors.OutOfRange("x"): grpc.StatusCode.OUT_OF_RANGE,
        errors.InvalidArgument("x"): grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound("x"): grpc.StatusCode.NOT_FOUND,
        errors.AlreadyExists("x"): grpc.StatusCode.ALREADY_EXISTS,
        errors.Aborted("x"): grpc.StatusCode.ABORTED,
        errors.HasChildren("x"): grpc.StatusCode.FAILED_PRECONDITION,
        errors.FailedPrecondition("x"): grpc.StatusCode.FAILED_PRECONDITION,
        errors.NoSpace("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.ResourceExhausted("x"): grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.StrataError("x"): grpc.StatusCode.INTERNAL,
        KeyError("x"): grpc.StatusCode.INTERNAL,
        errors.Unavailable("x"): grpc.StatusCode.UNAVAILABLE,
        errors.NoDriverAvailable("x"): grpc.StatusCode.UNAVAILABLE,  # a start-up without a driver
        errors.NotSupported("x"): grpc.StatusCode.UNAVAILABLE,
        errors.Unauthenticated("x"): grpc.StatusCode.UNAUTHENTICATED,
        errors.PermissionDenied("x"): grpc.StatusCode.PERMISSION_DENIED,
        errors.DigestMismatch("x"): grpc.StatusCode.DATA_LOSS,
        errors.Unsupported("x"): grpc.StatusCode.INVALID_ARGUMENT,
        errors.ReadOnly("x"): grpc.StatusCode.FAILED_PRECONDITION,
        errors.Relayed("DEADLINE_EXCEEDED", "x"): grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.Relayed("OK", "x"): grpc.StatusCode.UNKNOWN,  # a failure is never relayed as success
        errors.Relayed("NO_SUCH_CODE", "x"): grpc.StatusCode.UNKNOWN,
        NotImplementedError(): grpc.StatusCode.UNIMPLEMENTED,
    }
    for exc, code in expected.items():
        assert status_of(exc)[0] == code, type(exc).__name__
    assert status_of(KeyError("x"))[2] is False


def test_secrets_never_reach_logs(vfs_plugin: Harness, caplog: pytest.LogCaptureFixture) -> None:
    request = pb.CreateVolumeRequest(name="pvc-secret", volume_capabilities=[mount_cap()],
                                     secrets={"password": "hunter2-top-secret"})
    assert "hunter2" not in json.dumps(redacted(request))
    assert logged_ids(request) == {"name": "pvc-secret"}
    nested = pb.NodeStageVolumeRequest(volume_id="v", secrets={"k": "hunter2-top-secret"},
                                       volume_capability=mount_cap())
    assert redacted(nested)["secrets"] == "<redacted>"
    with caplog.at_level(logging.DEBUG, logger="strata"):
        vfs_plugin.controller.CreateVolume(request)
        code_of(lambda: vfs_plugin.controller.DeleteVolume(pb.DeleteVolumeRequest(
            volume_id="x", secrets={"token": "hunter2-top-secret"})))
    lines = [r.getMessage() for r in caplog.records if r.name == "strata.rpc" and r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.name == "strata.rpc" and r.levelno == logging.DEBUG]
    assert len(lines) == 2 and len(debug) == 2 and '"secrets": "<redacted>"' in debug[0]
    first = json.loads(lines[0])
    assert first["method"] == "/csi.v1.Controller/CreateVolume" and first["code"] == "OK"
    assert first["ids"] == {"name": "pvc-secret"} and first["duration_ms"] >= 0
    assert "hunter2" not in caplog.text


def test_store_transaction_rolls_back_together(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.add_volume(VolumeRecord(layer=LAYER, name="a", capacity=1))
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.set_volume(LAYER, state=RecordState.READY)
            store.delete_volume(LAYER)
            raise RuntimeError("crash inside")
    assert store.volume(LAYER) is not None and store.volume(LAYER).state is RecordState.PENDING  # type: ignore[union-attr]
    with pytest.raises(errors.AlreadyExists):
        store.add_volume(VolumeRecord(layer="vol-" + "1" * 32, name="a", capacity=1))
    store.close()
    reopened = StateStore(tmp_path)
    assert [v.name for v in reopened.volumes()] == ["a"]
    reopened.close()


def test_key_locks_abort_the_second_holder() -> None:
    locks = KeyLocks()
    with locks.hold("name:a", "vol:1"):
        with pytest.raises(errors.Aborted):
            with locks.hold("vol:1"):
                pass
        with locks.hold("name:b"):  # other keys never wait
            pass
    with locks.hold("vol:1"):
        pass


def test_concurrent_creates_with_duplicate_names(vfs_plugin: Harness) -> None:
    """8 clients, 4 names each asked for 6 times: every name ends as exactly one volume;
    racing calls get ABORTED (and succeed with the same volume on retry), never a second volume."""
    h = vfs_plugin
    names = [f"pvc-race-{i % 4}" for i in range(24)]
    start = threading.Barrier(8)
    aborted: list[str] = []

    def call(name: str) -> tuple[str, str]:
        request = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=MiB),
                                         volume_capabilities=[mount_cap()])
        try:
            start.wait(timeout=1)
        except threading.BrokenBarrierError:
            pass
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                return name, h.controller.CreateVolume(request).volume.volume_id
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
                aborted.append(name)
                time.sleep(0.005)  # back off as the CSI spec asks of a caller that got ABORTED
        raise AssertionError("never got through")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, names))
    ids_per_name: dict[str, set[str]] = {}
    for name, vid in results:
        ids_per_name.setdefault(name, set()).add(vid)
    assert all(len(ids) == 1 for ids in ids_per_name.values())
    listed = [e.volume.volume_id for e in h.controller.ListVolumes(pb.ListVolumesRequest()).entries]
    assert sorted(listed) == sorted(next(iter(ids)) for ids in ids_per_name.values())
    assert h.handle is not None and len(h.handle.plugin.driver.layers()) == 4

    # different volumes are staged and published in parallel
    def mount(vid: str) -> str:
        staging, target = h.mounted(vid, vid[:12])
        (target / "who").write_text(vid)
        h.release(vid, staging, target)
        return vid

    with ThreadPoolExecutor(8) as pool:
        assert Counter(pool.map(mount, listed)) == Counter(listed)
