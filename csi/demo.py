"""``strata demo``: the plugin end to end on a local socket, in one command.

Starts the CSI server (in this process) on a unix socket under a scratch directory with
the default driver, then, through a real gRPC client: creates a volume, stages and
publishes it in a kubelet-like tree, writes a file, snapshots the volume, changes the
file, restores the snapshot and clones the volume, checks both byte for byte, and tears
everything down. Prints each step with its time; exits 0 when every check held.

Usage: ``strata demo [--root DIR] [--driver auto|vfs|overlay|btrfs] [--keep]`` (needs root
for the mounts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from csi.host import mount as mnt
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc
from csi.services.server import ServeConfig, start_server

T = TypeVar("T")
CAP = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                          access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def step(text: str, action: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = action()
    print(f"  {text:<58} {(time.perf_counter() - start) * 1000:8.1f} ms", flush=True)
    return result


def run(root: Path, driver: str) -> int:
    handle = start_server(ServeConfig(root=root / "state", endpoint=f"unix://{root}/csi.sock", node_id="demo-node",
                                      driver=driver, grace_seconds=5))
    print(f"strata demo: plugin on {handle.endpoint}, layered driver {handle.plugin.driver.name}")
    channel = grpc.insecure_channel(handle.endpoint)
    ctl, node = rpc.ControllerStub(channel), rpc.NodeStub(channel)
    kubelet = root / "kubelet"
    paths = {name: (kubelet / "staging" / name, kubelet / "pods" / name / "mount") for name in ("vol", "restore", "clone")}
    for staging, target in paths.values():
        staging.parent.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)

    def create(name: str, source: pb.VolumeContentSource | None = None) -> pb.Volume:
        return ctl.CreateVolume(pb.CreateVolumeRequest(name=name, volume_capabilities=[CAP],
                                                       capacity_range=pb.CapacityRange(required_bytes=64 << 20),
                                                       volume_content_source=source)).volume

    def mount(key: str, vid: str) -> Path:
        staging, target = paths[key]
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                                       volume_capability=CAP))
        node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                                           target_path=str(target), volume_capability=CAP))
        return target

    def unmount(key: str, vid: str) -> None:
        staging, target = paths[key]
        node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)))
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)))

    payload = os.urandom(4 << 20)
    ok = True
    try:
        vol = step("CreateVolume pvc-demo (64 MiB)", lambda: create("pvc-demo"))
        target = step("NodeStageVolume + NodePublishVolume", lambda: mount("vol", vol.volume_id))
        step("write 4 MiB to data.bin", lambda: (target / "data.bin").write_bytes(payload))
        snap = step("CreateSnapshot snap-demo", lambda: ctl.CreateSnapshot(pb.CreateSnapshotRequest(
            name="snap-demo", source_volume_id=vol.volume_id)).snapshot)
        step("change data.bin after the snapshot", lambda: (target / "data.bin").write_bytes(b"changed"))
        restored = step("CreateVolume from the snapshot (restore)", lambda: create(
            "pvc-restore", pb.VolumeContentSource(snapshot={"snapshot_id": snap.snapshot_id})))
        clone = step("CreateVolume from the volume (clone)", lambda: create(
            "pvc-clone", pb.VolumeContentSource(volume={"volume_id": vol.volume_id})))
        r_target = step("mount the restored volume", lambda: mount("restore", restored.volume_id))
        c_target = step("mount the clone", lambda: mount("clone", clone.volume_id))
        checks = [("restored volume holds the snapshot's 4 MiB", (r_target / "data.bin").read_bytes() == payload),
                  ("clone holds the volume's current content", (c_target / "data.bin").read_bytes() == b"changed")]
        for text, held in checks:
            print(f"  check: {text}: {'ok' if held else 'FAILED'}")
            ok &= held
        for key, v in (("vol", vol), ("restore", restored), ("clone", clone)):
            step(f"unpublish, unstage, delete {key}", lambda k=key, v=v: (
                unmount(k, v.volume_id), ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id))))
        step("DeleteSnapshot snap-demo", lambda: ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(
            snapshot_id=snap.snapshot_id)))
        left = handle.plugin.driver.store.all()
        print(f"  check: no layer left behind: {'ok' if not left else f'FAILED ({len(left)} left)'}")
        ok &= not left
    finally:
        channel.close()
        handle.stop(grace=5)
    print("strata demo: " + ("all checks passed" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="strata demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="", help="scratch directory (default: a new one under /var/tmp)")
    parser.add_argument("--driver", default="auto", help="layered driver (default: auto)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("strata demo: needs root (it mounts volumes)", file=sys.stderr)
        return 2
    made = not args.root
    root = Path(args.root or tempfile.mkdtemp(prefix="strata-demo-", dir="/var/tmp")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run(root, args.driver)
    finally:
        if made and not args.keep:
            for mp in mnt.mounts_under(root):  # never delete through a mount left by a failure
                mnt.unmount(mp.target, detach=True)
            shutil.rmtree(root, ignore_errors=True)
