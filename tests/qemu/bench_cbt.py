"""Benchmark changed-block tracking in the qemu guest: GetMetadataDelta vs reading the data.

``python -m tests.qemu.bench_cbt [--size 1G] [--percent 1]`` boots one guest and runs
:func:`run` there (``--in-guest``): a plugin on devicemapper (loop-lvm pool, 64 KiB
blocks) served in-process over gRPC (Identity, Controller, SnapshotMetadata); a block
volume of ``--size`` filled completely, snapshot s1; ``--percent`` of its blocks (random,
fixed seed) overwritten with new content, snapshot s2. Timed:

* ``GetMetadataDelta(s1, s2)`` through the gRPC client, all responses (the pool's metadata);
* ``GetMetadataAllocated(s2)`` likewise;
* reading s2's device completely (what a backup without changed-block tracking reads),
  and reading s1 and s2 and comparing them block by block (how one would find the
  changed blocks without the pool's help); page cache dropped before each read.

The comparison also checks the answer: the blocks that differ are exactly the ones the
delta lists. Not part of the test run: speed is measured here, never asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.services.controller import ControllerService
from csi.services.listen import listen_unix, new_server
from csi.services.plugin import Plugin, PluginConfig
from csi.services.snapshot_metadata import SnapshotMetadataService
from csi.services.volume_ids import parse_id

from .guest import run_in_guest

REPO = Path(__file__).resolve().parents[2]
BLOCK = 64 << 10
CHUNK = 1 << 20


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _read_all(dev: Path) -> float:
    _drop_caches()
    start = time.perf_counter()
    with open(dev, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass
    return time.perf_counter() - start


def _compare(a: Path, b: Path) -> tuple[float, set[int]]:
    _drop_caches()
    differ: set[int] = set()
    start = time.perf_counter()
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        base = 0
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if not x:
                break
            if x != y:
                for i in range(0, len(x), BLOCK):
                    if x[i:i + BLOCK] != y[i:i + BLOCK]:
                        differ.add((base + i) // BLOCK)
            base += len(x)
    return time.perf_counter() - start, differ


def run(size: int, percent: float, workdir: Path) -> dict[str, Any]:
    options = {"dm.loopback": "true", "dm.loopdatasize": f"{3 * size + (1 << 30)}", "dm.loopmetadatasize": "64M",
               "dm.blocksize": "64K", "dm.min_free_space": "1"}
    plugin = Plugin(PluginConfig(root=workdir, node_id="bench", driver="devicemapper", driver_options=options))
    server = new_server(4, "cbt-bench")
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(plugin), server)
    csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataService(plugin), server)
    endpoint = listen_unix(server, workdir / "csi.sock")
    server.start()
    channel = grpc.insecure_channel(endpoint)
    ctl, meta = csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.SnapshotMetadataStub(channel)
    driver = plugin.driver
    cap = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    result: dict[str, Any] = {"volume_bytes": size, "block_bytes": BLOCK}
    try:
        vol = ctl.CreateVolume(pb.CreateVolumeRequest(name="bench", capacity_range=pb.CapacityRange(required_bytes=size),
                                                      volume_capabilities=[cap])).volume.volume_id
        layer, _ = parse_id(vol)
        dev = driver.get_block(layer)
        start = time.perf_counter()
        with open(dev, "r+b", buffering=0) as f:
            for off in range(0, size, CHUNK):
                f.write(off.to_bytes(8, "little") * (CHUNK // 8))
            os.fsync(f.fileno())
        result["fill_s"] = round(time.perf_counter() - start, 2)
        s1 = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="bench-s1", source_volume_id=vol)).snapshot.snapshot_id
        nblocks = size // BLOCK
        changed = set(random.Random(12).sample(range(nblocks), max(1, round(nblocks * percent / 100))))
        with open(dev, "r+b", buffering=0) as f:
            for b in sorted(changed):
                f.seek(b * BLOCK)
                f.write(b"\xa5" * BLOCK)
            os.fsync(f.fileno())
        driver.put(layer)
        s2 = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="bench-s2", source_volume_id=vol)).snapshot.snapshot_id
        result["changed_blocks"] = len(changed)

        start = time.perf_counter()
        listed = [m.byte_offset for r in meta.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=s1, target_snapshot_id=s2)) for m in r.block_metadata]
        result["delta_s"] = round(time.perf_counter() - start, 3)
        assert listed == [b * BLOCK for b in sorted(changed)], "the delta is not the blocks written"
        start = time.perf_counter()
        allocated = sum(len(r.block_metadata) for r in meta.GetMetadataAllocated(
            pb.GetMetadataAllocatedRequest(snapshot_id=s2)))
        result["allocated_s"] = round(time.perf_counter() - start, 3)
        assert allocated == nblocks

        l1, l2 = parse_id(s1)[0], parse_id(s2)[0]
        d1, d2 = driver.get_block(l1), driver.get_block(l2)
        try:
            result["read_target_s"] = round(_read_all(d2), 2)
            result["read_compare_both_s"], differ = _compare(d1, d2)
            result["read_compare_both_s"] = round(result["read_compare_both_s"], 2)
        finally:
            driver.put(l1)
            driver.put(l2)
        assert differ == changed, "reading the data found other changed blocks than the delta"
        result["delta_vs_read_target"] = round(result["read_target_s"] / result["delta_s"], 1)
        return result
    finally:
        channel.close()
        server.stop(0)
        driver.release_pool()  # type: ignore[attr-defined]
        plugin.close()


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.qemu.bench_cbt")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--in-guest", action="store_true", help="run the measurement here (inside the guest)")
    args = parser.parse_args(argv)
    if args.in_guest:
        workdir = Path(os.environ.get("STRATA_TEST_SCRATCH", "/var/tmp")) / "cbt-bench"
        workdir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(_size(args.size), args.percent, workdir), indent=1))
        return 0
    script = (f"cd {shlex.quote(str(REPO))}\nexec {shlex.quote(sys.executable)} -m tests.qemu.bench_cbt --in-guest "
              f"--size {shlex.quote(args.size)} --percent {args.percent}\n")
    result = run_in_guest(script, timeout_s=1800, memory_mib=2048)
    sys.stdout.write(result.output)
    print(f"(guest run {result.seconds:.0f}s under qemu TCG)", file=sys.stderr)
    return result.exit_status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
