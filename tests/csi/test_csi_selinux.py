"""SELinux mounts: the ``context=`` flag of the mount capability reaches mount(2) at stage
where the driver gives each volume its own superblock (overlay), and is refused, saying
why, where it cannot (vfs directories, btrfs subvolumes share one superblock).

This kernel may have no SELinux: then the overlay driver must not pass ``context=`` (the
kernel would refuse the mount), so the test makes the driver believe SELinux is there and
records the mount(2) request, passing it on without the label — the option is shown
reaching the mount call. With SELinux, the label is read back from /proc/self/mountinfo.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc
import pytest
from csi_harness import Harness, code_of, mount_cap, record_mounts_as_if_selinux

from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb

LABEL = "system_u:object_r:container_file_t:s0:c12,c34"
SELINUX = os.path.isdir("/sys/fs/selinux")


def test_overlay_context_reaches_mount(plugin_on: Callable[[str], Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    h = plugin_on("overlay")
    seen: list[mnt.Mount] = [] if SELINUX else record_mounts_as_if_selinux(monkeypatch)
    vid = h.create_volume("pvc-label").volume_id
    staging = h.staging_path("label")
    h.stage(vid, staging, mount_cap(flags=(f'context="{LABEL}"',)))
    if SELINUX:
        layer_mounts = [mp for mp in mnt.mount_points() if mp.fstype == "overlay" and str(h.root) in mp.target]
        assert any(f"context={LABEL}" in ",".join(mp.super_options).replace('"', "") for mp in layer_mounts)
    else:
        overlays = [m for m in seen if m.fstype == "overlay"]
        assert overlays, "no overlay mount was made at stage"
        assert f'context="{LABEL}"' in overlays[-1].options
    target = h.target_path("label")
    h.publish(vid, staging, target, cap=mount_cap(flags=(f'context="{LABEL}"',)))
    (target / "f").write_bytes(b"labelled")
    h.release(vid, staging, target)


@pytest.mark.parametrize("driver", ["vfs", "btrfs"])
def test_context_refused_where_volumes_share_a_superblock(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    vid = h.create_volume("pvc-nolabel").volume_id
    staging = h.staging_path("nolabel")
    before = h.disk_state()
    request = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                        volume_capability=mount_cap(flags=(f'context="{LABEL}"',)))
    with pytest.raises(grpc.RpcError) as err:
        h.node.NodeStageVolume(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert driver in err.value.details() and "seLinuxMount" in err.value.details()
    assert h.disk_state() == before
    # the same stage without the label works
    assert code_of(lambda: h.stage(vid, h.staging_path("nolabel"))) == grpc.StatusCode.OK
