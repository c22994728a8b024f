"""Crash safety: ``strata serve`` as a child process, killed with SIGKILL between and
during steps, then restarted on the same root. Every acknowledged volume and snapshot
must be listed with its data, publications intact or restored, half-done work rolled
back or finished, and nothing leaked (no unknown layer, no stray directory, no stray
mount). SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_harness import Harness, MiB, ServeProcess, Stubs, files_of, mount_cap

from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb
from csi.state.store import RecordState


def create(stubs: Stubs, name: str, source: pb.VolumeContentSource | None = None) -> pb.Volume:
    return stubs.controller.CreateVolume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=MiB), volume_capabilities=[mount_cap()],
        volume_content_source=source)).volume


def assert_consistent(h: Harness) -> None:
    """Records and disk agree: no pending rows, no unknown layers, no stray mounts."""
    assert h.handle is not None
    plugin = h.handle.plugin
    volumes, snapshots = plugin.store.volumes(), plugin.store.snapshots()
    assert all(v.state is RecordState.READY for v in volumes)
    assert all(s.state is RecordState.READY for s in snapshots)
    visible = {l.id for l in plugin.driver.layers()}
    assert visible == {v.layer for v in volumes} | {s.layer for s in snapshots}
    for layer in plugin.driver.store.all():
        if layer.hidden:  # kept only while something is built on it
            assert plugin.driver.store.children(layer.id)
    assert plugin.driver._on_disk() == {l.id for l in plugin.driver.store.all()}  # noqa: SLF001
    pubs = plugin.store.publications()
    assert all(p.state is RecordState.READY and mnt.is_mount_point(p.path) for p in pubs)
    kubelet_mounts = {mp.target for mp in mnt.mounts_under(h.kubelet)}
    assert kubelet_mounts == {p.path for p in pubs}
    for layer in plugin.driver.store.all():
        assert layer.mounts == sum(1 for p in pubs if p.layer == layer.id and p.kind == "stage")


@pytest.fixture
def crash_harness(request: pytest.FixtureRequest, ext4_dir: Path) -> Iterator[Harness]:
    driver = getattr(request, "param", "vfs")
    base = request.getfixturevalue("btrfs_dir") if driver == "btrfs" else ext4_dir
    h = Harness(Path(base) / "csi-crash", driver)
    yield h
    h.teardown()


@pytest.mark.parametrize("crash_harness", ["vfs", "overlay", "btrfs"], indirect=True)
def test_kill9_between_steps(crash_harness: Harness, tmp_path: Path) -> None:
    h = crash_harness
    proc = ServeProcess(h, tmp_path / "serve.log")
    stubs = proc.start()
    vol = create(stubs, "pvc-1")
    staging, target = h.staging_path("p1"), h.target_path("p1")
    stubs.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(staging),
                                                         volume_capability=mount_cap()))
    proc.kill9()
    stubs = proc.start()
    stubs.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap()))
    (target / "f").write_bytes(b"before the crash")
    snap = stubs.controller.CreateSnapshot(pb.CreateSnapshotRequest(name="s1", source_volume_id=vol.volume_id)).snapshot
    proc.kill9()
    # a bind mount lost behind the plugin's back must come back at restart
    mnt.unmount(target)
    stubs = proc.start()
    assert (target / "f").read_bytes() == b"before the crash"
    clone = create(stubs, "pvc-clone", pb.VolumeContentSource(volume={"volume_id": vol.volume_id}))
    proc.kill9()
    h.start()
    try:
        listed = {e.volume.volume_id for e in h.controller.ListVolumes(pb.ListVolumesRequest()).entries}
        assert listed == {vol.volume_id, clone.volume_id}
        assert [e.snapshot.snapshot_id for e in h.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries] \
            == [snap.snapshot_id]
        assert_consistent(h)
        restored = h.create_volume("pvc-restored", source=pb.VolumeContentSource(
            snapshot={"snapshot_id": snap.snapshot_id}))
        for vid, pod in ((restored.volume_id, "r"), (clone.volume_id, "c")):
            s, t = h.mounted(vid, pod)
            assert files_of(t) == {"f": b"before the crash"}
            h.release(vid, s, t)
        h.release(vol.volume_id, staging, target)
    finally:
        h.stop()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill9_during_work(crash_harness: Harness, tmp_path: Path, seed: int) -> None:
    """A client creates, snapshots, clones, stages and publishes as fast as it can; the
    server is killed at a random moment; after restart all acknowledged work is there."""
    rng = random.Random(seed)
    h = crash_harness
    proc = ServeProcess(h, tmp_path / "serve.log")
    stubs = proc.start()
    base = create(stubs, "pvc-base")
    staging, target = h.staging_path("base"), h.target_path("base")
    stubs.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=base.volume_id, staging_target_path=str(staging),
                                                         volume_capability=mount_cap()))
    stubs.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=base.volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap()))
    (target / "payload").write_bytes(bytes(range(256)) * 4096)
    acked: dict[str, str] = {}  # CSI id -> kind
    published: dict[str, tuple[Path, Path]] = {}
    stop = threading.Event()

    def work() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                step = i % 4
                if step == 0:
                    acked[create(stubs, f"pvc-{i}").volume_id] = "volume"
                elif step == 1:
                    s = stubs.controller.CreateSnapshot(pb.CreateSnapshotRequest(
                        name=f"snap-{i}", source_volume_id=base.volume_id)).snapshot
                    acked[s.snapshot_id] = "snapshot"
                elif step == 2:
                    c = create(stubs, f"clone-{i}", pb.VolumeContentSource(volume={"volume_id": base.volume_id}))
                    acked[c.volume_id] = "clone"
                else:
                    vid = next((v for v, k in acked.items() if k == "volume" and v not in published), None)
                    if vid is None:
                        continue
                    stg, tgt = h.staging_path(f"w{i}"), h.target_path(f"w{i}")
                    stubs.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                        volume_id=vid, staging_target_path=str(stg), volume_capability=mount_cap()))
                    stubs.node.NodePublishVolume(pb.NodePublishVolumeRequest(
                        volume_id=vid, staging_target_path=str(stg), target_path=str(tgt),
                        volume_capability=mount_cap()))
                    published[vid] = (stg, tgt)
            except grpc.RpcError:
                return  # the server died under this call: its outcome is not acknowledged

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 30
    while not acked and time.monotonic() < deadline:  # a loaded machine may be slow to answer the first call
        time.sleep(0.01)
    time.sleep(rng.uniform(0.05, 0.8))
    proc.kill9()
    stop.set()
    worker.join(timeout=30)
    stubs.channel.close()
    assert len(acked) > 0, "the client got some work acknowledged before the kill"

    h.start()
    try:
        assert_consistent(h)
        volumes = {e.volume.volume_id for e in h.controller.ListVolumes(pb.ListVolumesRequest()).entries}
        snapshots = {e.snapshot.snapshot_id for e in h.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries}
        for cid, kind in acked.items():
            assert cid in (snapshots if kind == "snapshot" else volumes), f"acknowledged {kind} {cid} lost"
        expected = (bytes(range(256)) * 4096)
        assert (target / "payload").read_bytes() == expected
        for vid, (stg, tgt) in published.items():
            assert mnt.is_mount_point(tgt)
        checked = 0
        for cid, kind in acked.items():
            if kind == "clone" and checked < 2:
                s, t = h.mounted(cid, f"check-{checked}")
                assert (t / "payload").read_bytes() == expected
                h.release(cid, s, t)
                checked += 1
    finally:
        h.stop()


def test_sigterm_drains_and_exits_zero(crash_harness: Harness, tmp_path: Path) -> None:
    """A clone that copies 256 MiB (vfs on ext4) is in flight when SIGTERM arrives: it
    completes and is answered, then the server exits 0 and removes its socket."""
    h = crash_harness
    proc = ServeProcess(h, tmp_path / "serve.log")
    stubs = proc.start()
    vol = create(stubs, "pvc-term")
    staging = h.staging_path("term")
    stubs.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(staging),
                                                         volume_capability=mount_cap()))
    block = os.urandom(MiB)
    with open(staging / "big", "wb") as f:
        for _ in range(256):
            f.write(block)
    answers: list[pb.Volume] = []
    cloning = threading.Thread(target=lambda: answers.append(
        create(stubs, "pvc-term-clone", pb.VolumeContentSource(volume={"volume_id": vol.volume_id}))))
    cloning.start()
    time.sleep(0.05)
    assert proc.terminate() == 0
    cloning.join(timeout=30)
    assert len(answers) == 1, "the in-flight clone was answered before exit"
    log = (tmp_path / "serve.log").read_text()
    assert log.index("signal received") < log.index('"name": "pvc-term-clone"'), "the clone finished after SIGTERM"
    assert not h.config.socket_path().exists()
    stubs.channel.close()
    h.start()
    try:
        listed = {e.volume.volume_id for e in h.controller.ListVolumes(pb.ListVolumesRequest()).entries}
        assert listed == {vol.volume_id, answers[0].volume_id}
        assert_consistent(h)
        h.unstage(vol.volume_id, staging)
    finally:
        h.stop()
