"""ControllerModifyVolume (VolumeAttributesClass) and infeasible expansion, over the real
socket on vfs, overlay and btrfs.

* btrfs can change ``compression`` (zstd|lzo|zlib|none) of a live volume, and takes it at
  CreateVolume (StorageClass parameter or mutable_parameters): after a modify, new writes
  are compressed — read back from the kernel with FIEMAP (``filefrag -v`` shows btrfs's
  compressed extents as ``encoded``) and the property with ``btrfs property get``.
* vfs and overlay cannot: INVALID_ARGUMENT naming the driver, nothing changed.
* ControllerExpandVolume that would shrink (limit_bytes below the capacity) or grow past
  the backing store's free space: OUT_OF_RANGE, nothing changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from csi_harness import Harness, MiB, code_of, mount_cap

from csi.proto import csi_pb2 as pb

C = grpc.StatusCode


def encoded_extents(path: Path) -> tuple[int, int]:
    """(extents, of them encoded) of a file, from FIEMAP via filefrag -v."""
    out = subprocess.run(["filefrag", "-v", str(path)], check=True, capture_output=True, text=True).stdout
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and ":" in line]
    return len(rows), sum(1 for line in rows if "encoded" in line)


def write_compressible(path: Path, size: int = 8 * MiB) -> None:
    chunk = (b"strata compressible record 0123456789 " * 4096)[:1 << 17]
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def modify(h: Harness, vid: str, **params: str) -> grpc.StatusCode:
    return code_of(lambda: h.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters=params)))


def test_btrfs_compression_modify(plugin_on: Callable[[str], Harness]) -> None:
    h = plugin_on("btrfs")
    if shutil.which("filefrag") is None:
        pytest.skip("filefrag (e2fsprogs) not installed: run .ci/setup")
    vid = h.create_volume("pvc-zip", size=256 * MiB).volume_id
    staging, target = h.mounted(vid, "zip")
    write_compressible(target / "before")
    extents, encoded = encoded_extents(target / "before")
    assert extents > 0 and encoded == 0, "btrfs compressed without being asked: the check would prove nothing"

    assert modify(h, vid, compression="zstd") == C.OK
    assert modify(h, vid, compression="zstd") == C.OK  # idempotent
    write_compressible(target / "after")
    extents, encoded = encoded_extents(target / "after")
    assert encoded == extents > 0, f"new writes after modify are not compressed ({encoded}/{extents} encoded)"
    prop = subprocess.run(["btrfs", "property", "get", str(target), "compression"], check=True,
                          capture_output=True, text=True).stdout
    assert "zstd" in prop

    assert modify(h, vid, compression="none") == C.OK
    write_compressible(target / "after-none")
    assert encoded_extents(target / "after-none")[1] == 0
    # the record keeps what was set; data written before stays as it was
    assert h.handle is not None
    assert dict(h.handle.plugin.store.volume(vid.split("@")[0]).mutable) == {"compression": "none"}
    assert encoded_extents(target / "after")[1] > 0

    before = h.disk_state()
    for bad in ({"compression": "gzip"}, {"iops": "100"}, {}):
        assert modify(h, vid, **bad) == C.INVALID_ARGUMENT, bad
    assert h.disk_state() == before
    h.release(vid, staging, target)


@pytest.mark.parametrize("how", ["parameters", "mutable_parameters"])
def test_btrfs_compression_at_create(plugin_on: Callable[[str], Harness], how: str) -> None:
    h = plugin_on("btrfs")
    vid = h.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-lzo", capacity_range=pb.CapacityRange(required_bytes=64 * MiB), volume_capabilities=[mount_cap()],
        **{how: {"compression": "lzo"}})).volume.volume_id
    staging, target = h.mounted(vid, "lzo")
    prop = subprocess.run(["btrfs", "property", "get", str(target), "compression"], check=True,
                          capture_output=True, text=True).stdout
    assert "lzo" in prop
    write_compressible(target / "f")
    assert encoded_extents(target / "f")[1] > 0
    h.release(vid, staging, target)


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_modify_infeasible_names_the_driver(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    vid = h.create_volume("pvc-nozip").volume_id
    before = h.disk_state()
    with pytest.raises(grpc.RpcError) as err:
        h.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters={"compression": "zstd"}))
    assert err.value.code() == C.INVALID_ARGUMENT and driver in err.value.details()
    for how in ("parameters", "mutable_parameters"):
        with pytest.raises(grpc.RpcError) as err:
            h.controller.CreateVolume(pb.CreateVolumeRequest(name="pvc-z", volume_capabilities=[mount_cap()],
                                                             **{how: {"compression": "zstd"}}))
        assert err.value.code() == C.INVALID_ARGUMENT and driver in err.value.details()
    assert h.disk_state() == before


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_expansion_infeasible_changes_nothing(plugin_on: Callable[[str], Harness], driver: str) -> None:
    h = plugin_on(driver)
    vid = h.create_volume("pvc-grow", size=8 * MiB).volume_id
    staging, target = h.mounted(vid, "grow")
    assert h.handle is not None
    cap = h.handle.plugin.driver.capacity()
    beyond_free = 8 * MiB + cap.available_bytes + 64 * MiB
    assert beyond_free <= cap.total_bytes, "the filesystem is too empty to ask for more than its free space"
    before = h.disk_state()
    rng = pb.CapacityRange
    cases = {
        "shrink": rng(required_bytes=4 * MiB, limit_bytes=4 * MiB),
        "limit below capacity": rng(limit_bytes=4 * MiB),
        "past free space": rng(required_bytes=beyond_free),
    }
    for what, capacity_range in cases.items():
        got = code_of(lambda: h.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=capacity_range)))
        assert got == C.OUT_OF_RANGE, what
        assert h.disk_state() == before, what
    # a range the volume already satisfies is success, unchanged
    same = h.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=rng(required_bytes=4 * MiB)))
    assert same.capacity_bytes == 8 * MiB
    h.release(vid, staging, target)
