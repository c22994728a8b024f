"""Group snapshots, ControllerModifyVolume and SELinux mounts on devicemapper, over the
real gRPC socket (an in-process plugin served on a unix socket, as tests/csi do, so the
SELinux check can stand in for a kernel without SELinux). Runs inside the qemu guest only.

* a group snapshot of two filesystem volumes while another process alternately appends
  numbered records to both; restored, the two members' last records differ by at most one
  (devicemapper holds the writer processes, as the other drivers do: FIFREEZE followed by
  the thin snapshot's own dm suspend answers EBUSY on 6.1, so ``snapshot_below_filesystem``
  stays off until that suspend skips lockfs). Then GetVolumeGroupSnapshot and
  DeleteVolumeGroupSnapshot (idempotent; Get afterwards is NOT_FOUND);
* ControllerModifyVolume of a mutable parameter devicemapper cannot change is
  INVALID_ARGUMENT naming the driver;
* NodeStageVolume with a ``context=`` mount flag: devicemapper gives each volume its own
  superblock, so the label is promised to reach mount(2) (csi/services/node.py
  ``_check_label``, README "SELinux"): the mount(2) request carries it.

Sizes are small (a 1 GiB sparse pool, 32 MiB volumes, a short writer): software emulation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "csi"))  # the CSI harness (tests/csi)
from check_csi_devicemapper import STORAGE_OPTS, create, thin_devices
from csi_harness import Harness, MiB, code_of, mount_cap, record_mounts_as_if_selinux

from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb

C = grpc.StatusCode
LABEL = "system_u:object_r:container_file_t:s0"

# appends "<n>\n" to argv[1]/log then to argv[2]/log, n = 0, 1, 2, ... until killed
WRITER = """
import os, sys
fds = [os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for d in sys.argv[1:3]]
n = 0
while True:
    for fd in fds:
        os.write(fd, b"%08d\\n" % n)
    n += 1
"""


@pytest.fixture
def plugin(guest_scratch: Path, dm_release: Callable[[Path], None]) -> Iterator[Harness]:
    h = Harness(guest_scratch / "csi-dm", "devicemapper")
    h.config = replace(h.config, storage_opts=STORAGE_OPTS)
    h.start()
    try:
        yield h
    finally:
        h.teardown()
        dm_release(h.root / "devicemapper")


def records(path: Path) -> int:
    """Count of the complete records in ``path`` (the last one's number + 1)."""
    lines = path.read_bytes().split(b"\n")
    complete = [ln for ln in lines if len(ln) == 8]
    if not complete:
        return 0
    assert [int(x) for x in complete] == list(range(len(complete))), f"{path}: records out of order"
    return len(complete)


def test_group_snapshot_is_crash_consistent(plugin: Harness) -> None:
    h = plugin
    vols = [create(h, f"pvc-g{i}", 32 * MiB, mount_cap()) for i in range(2)]
    targets = [h.mounted(v.volume_id, f"pod-g{i}")[1] for i, v in enumerate(vols)]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, *map(str, targets)])
    try:
        deadline = time.monotonic() + 120
        while not all((t / "log").exists() and (t / "log").stat().st_size >= 9 * 50 for t in targets):
            assert writer.poll() is None, "the writer died"
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.05)
        group = h.group.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
            name="grp-1", source_volume_ids=[v.volume_id for v in vols])).group_snapshot
        time.sleep(0.2)  # the writer carries on after the thaw
        assert writer.poll() is None, "the writer died during the group snapshot"
    finally:
        writer.kill()
        writer.wait()
    assert group.ready_to_use and len(group.snapshots) == 2
    live = [records(t / "log") for t in targets]
    by_source = {s.source_volume_id: s for s in group.snapshots}
    assert set(by_source) == {v.volume_id for v in vols}

    restored, counts = [], []
    for i, v in enumerate(vols):
        snap = by_source[v.volume_id]
        assert snap.group_snapshot_id == group.group_snapshot_id
        r = create(h, f"pvc-r{i}", 32 * MiB, mount_cap(),
                   pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
        staging, target = h.mounted(r.volume_id, f"pod-r{i}")
        counts.append(records(target / "log"))
        restored.append((r.volume_id, staging, target))
    assert all(c >= 50 for c in counts), counts
    assert all(c < n for c, n in zip(counts, live)), (counts, live)  # taken while writing, not after
    assert 0 <= counts[0] - counts[1] <= 1, f"the members' last records differ by more than one: {counts}"

    # Get: the group and its members; a wrong member list is INVALID_ARGUMENT
    ids = [s.snapshot_id for s in group.snapshots]
    got = h.group.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids)).group_snapshot
    assert got.group_snapshot_id == group.group_snapshot_id and sorted(s.snapshot_id for s in got.snapshots) == sorted(ids)
    assert code_of(lambda: h.group.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[:1]))) == C.INVALID_ARGUMENT
    # a member cannot be deleted alone
    assert code_of(lambda: h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=ids[0]))) \
        == C.FAILED_PRECONDITION

    for vid, staging, target in restored:
        h.release(vid, staging, target)
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    delete = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids)
    h.group.DeleteVolumeGroupSnapshot(delete)
    h.group.DeleteVolumeGroupSnapshot(delete)  # idempotent
    assert code_of(lambda: h.group.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids))) == C.NOT_FOUND
    assert h.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries == []

    # the members' filesystems were thawed: they take writes
    for t in targets:
        with open(t / "after", "wb") as f:
            f.write(b"thawed")
            os.fsync(f.fileno())
    for i, v in enumerate(vols):
        h.release(v.volume_id, h.staging_path(f"pod-g{i}"), targets[i])
        h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))
    assert thin_devices() == set()


def test_modify_volume_refused_naming_devicemapper(plugin: Harness) -> None:
    h = plugin
    vol = create(h, "pvc-mod", 32 * MiB, mount_cap())
    with pytest.raises(grpc.RpcError) as err:
        h.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"compression": "zstd"}))
    assert err.value.code() == C.INVALID_ARGUMENT
    assert "devicemapper" in err.value.details()
    h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_selinux_context_reaches_mount(plugin: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """As tests/csi/test_csi_selinux.py on overlay: without SELinux in this kernel the driver
    is made to believe it is there, and the mount(2) requests are recorded (and passed on
    without the label, which the kernel would refuse)."""
    h = plugin
    selinux = os.path.isdir("/sys/fs/selinux")
    seen: list[mnt.Mount] = [] if selinux else record_mounts_as_if_selinux(monkeypatch)
    vol = create(h, "pvc-label", 32 * MiB, mount_cap())
    staging = h.staging_path("label")
    cap = mount_cap(flags=(f'context="{LABEL}"',))
    h.stage(vol.volume_id, staging, cap)  # devicemapper: a superblock of its own, not refused
    if selinux:
        own = [mp for mp in mnt.mount_points() if mp.fstype == "ext4" and str(h.root) in mp.target]
        assert any(f"context={LABEL}" in ",".join(mp.super_options).replace('"', "") for mp in own)
    else:
        ext4 = [m for m in seen if m.fstype == "ext4"]
        assert ext4, "no ext4 mount was made at stage"
        assert any(o.startswith("context=") and LABEL in o for o in ext4[-1].options), \
            f"the context= flag did not reach mount(2) on devicemapper: {ext4[-1].options}"
    target = h.target_path("label")
    h.publish(vol.volume_id, staging, target, cap=cap)
    (target / "f").write_bytes(b"labelled")
    h.release(vol.volume_id, staging, target)
    h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
