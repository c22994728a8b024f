"""Cross-node restore benchmark (issue 12): two ``strata serve`` nodes in network namespaces
joined by veth pairs (tests/peers/netns.py), the real channel (TLS, ServiceAccount tokens
checked by TokenReview on the API stand-in, Node addresses from it).

Node A holds a volume with ``--size`` bytes of incompressible data in 4 MiB files (written
through its published path and fsynced) and a snapshot of it. Measured, one run each:

* the digest of the new snapshot: A hashes its layers in the background after the cut
  (``--digest-snapshots``); a GetChain from B right after CreateSnapshot waits for it — the
  time is printed, and nothing below runs beside it;
* baseline: ``tar -c`` of the same tree on A piped over TCP to node B's namespace
  (``busybox nc``; B discards it) — the rate this network and tar reach;
* the copy: the same with ``tar -x`` on B and a ``sync -f`` of its file system — a plain copy
  of the tree onto B's disk, which a restore is (the disk's write rate varies here from run
  to run: both are measured in the same run);
* restore on B: CreateVolume from A's snapshot (B asks for the chain over the channel, fetches
  the layer's bytes on A's bulk lane, verifies, imports durably, creates the volume); rate =
  the tree's bytes / time (goal ≥ 80 % of the baseline);
* second restore on B of the same snapshot: nothing moves (goal ≤ 50 ms).

    python -m tests.peers.bench_crossnode [--size 1G] [--driver overlay] [--scratch /var/tmp]

A script, not a test: speed is measured here, not asserted in the suite.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "csi"))
from kube_standin import KubeStandIn  # noqa: E402
from netns import Network, bind_in, stop  # noqa: E402
from peer_pki import PEER_NAME, make_pki  # noqa: E402

from csi.host import mount as mnt  # noqa: E402
from csi.host.fsinfo import parse_size  # noqa: E402
from csi.proto import csi_pb2 as pb  # noqa: E402
from csi.proto import csi_pb2_grpc as rpc  # noqa: E402

PORT, NC_PORT = 9839, 9900
# nc's part, in Python (busybox nc sends nothing from a pipe here): receive and count; send stdin
RECEIVE = ("import socket, sys\ns = socket.create_server((sys.argv[1], int(sys.argv[2])))\nc, _ = s.accept()\n"
           "n = 0\nwhile b := c.recv(1 << 20):\n    n += len(b)\nopen(sys.argv[3], 'w').write(str(n))\n")
# the same, writing what it receives to stdout (for tar -x)
UNPACK = ("import socket, sys\ns = socket.create_server((sys.argv[1], int(sys.argv[2])))\nc, _ = s.accept()\n"
          "out = sys.stdout.buffer\nwhile b := c.recv(1 << 20):\n    out.write(b)\nout.flush()\n")
SEND = ("import socket, sys; c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); "
        "[c.sendall(b) for b in iter(lambda: sys.stdin.buffer.read(1 << 20), b\"\")]; c.close()")
NODE_SA = "strata/strata-node"
FILE = 4 << 20


def cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(
                                   mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def create(ctl: rpc.ControllerStub, name: str, size: int, source: pb.VolumeContentSource | None = None) -> str:
    request = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                     volume_capabilities=[cap()])
    if source is not None:
        request.volume_content_source.CopyFrom(source)
    while True:
        try:
            return ctl.CreateVolume(request, timeout=3600).volume.volume_id
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            time.sleep(0.05)


def disk_floor(directory: Path, pool: bytes, size: int) -> None:
    """The files written as the restore's applier writes large ones (O_DIRECT from a
    page-aligned buffer, 1 MiB at a time), each fsynced at the end."""
    aligned = mmap.mmap(-1, FILE)
    fds = []
    for i in range(max(1, size // FILE)):
        aligned[:] = pool[i % 4096:][:FILE]
        fd = os.open(directory / f"data-{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        for at in range(0, FILE, 1 << 20):
            os.write(fd, memoryview(aligned)[at:at + (1 << 20)])
        fds.append(fd)
    for fd in fds:
        os.fsync(fd)
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.bench_crossnode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--driver", default="overlay", choices=("vfs", "overlay"))
    parser.add_argument("--scratch", default="/var/tmp")
    args = parser.parse_args(argv)
    size = parse_size(args.size, "--size")
    work = Path(tempfile.mkdtemp(prefix="strata-crossnode-", dir=args.scratch))
    net = Network()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        kube = KubeStandIn.start(bind_in(net.hub, net.hub_ip))
        pki = make_pki(work / "pki")
        token = work / "node.token"
        token.write_text(kube.token(NODE_SA) + "\n")
        hosts, channels = {}, {}
        for name in ("node-a", "node-b"):
            host = hosts[name] = net.add(name)
            kube.nodes[name] = host.ip
            base = work / name
            base.mkdir()
            sock = base / "csi.sock"
            procs.append(host.popen(
                [sys.executable, "-m", "csi.cli", "serve", f"--endpoint=unix://{sock}", f"--node-id={name}",
                 f"--root={base / 'root'}", f"--driver={args.driver}", f"--peer-listen={host.ip}:{PORT}",
                 f"--tls-cert={pki.cert}", f"--tls-key={pki.key}", "--peer-audience=strata-peer",
                 f"--peer-account={NODE_SA}", f"--tls-ca={pki.ca}", f"--token-file={token}",
                 f"--peer-server-name={PEER_NAME}", "--log-level=warning"],
                env=kube.env(work / "kubeconfig"), log=base / "serve.log"))
            channels[name] = grpc.insecure_channel(f"unix://{sock}")
            grpc.channel_ready_future(channels[name]).result(timeout=120)
        a_ctl, a_node = rpc.ControllerStub(channels["node-a"]), rpc.NodeStub(channels["node-a"])
        b_ctl = rpc.ControllerStub(channels["node-b"])
        vol = create(a_ctl, "pvc-src", size + (64 << 20))
        staging, target = work / "kubelet" / "staging", work / "kubelet" / "target"
        staging.parent.mkdir(parents=True)
        a_node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol, staging_target_path=str(staging),
                                                         volume_capability=cap()))
        a_node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vol, staging_target_path=str(staging),
                                                             target_path=str(target), volume_capability=cap()))
        pool = os.urandom(FILE + 4096)
        for i in range(max(1, size // FILE)):
            with open(target / f"data-{i:05d}", "wb") as f:
                f.write(pool[i % 4096:][:FILE])
                os.fsync(f.fileno())
        snap = a_ctl.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vol, name="snap"),
                                    timeout=600).snapshot.snapshot_id
        # A hashes the new snapshot's layers in the background (--digest-snapshots); GetChain from
        # B waits for that, so the baseline below does not share the cores with it
        started = time.perf_counter()
        hosts["node-b"].run([sys.executable, str(HERE / "peer_client.py"), f"{hosts['node-a'].ip}:{PORT}",
                             "--ca", str(pki.ca), "--token-file", str(token), "--server-name", PEER_NAME,
                             "chain", snap], check=True, timeout=600, capture_output=True)
        digest_s = time.perf_counter() - started
        os.sync()

        tar_s = copy_s = 0.0
        sender = (f"tar -cf - -C {target} . | {sys.executable} -c '{SEND}' {hosts['node-b'].ip} {NC_PORT}")
        for round_ in range(2):  # the baseline, then the copy to B's disk
            received, unpacked = work / f"received-{round_}", work / f"unpacked-{round_}"
            unpacked.mkdir()
            if round_ == 0:
                receiver = hosts["node-b"].popen([sys.executable, "-c", RECEIVE, hosts["node-b"].ip, str(NC_PORT),
                                                  str(received)])
            else:
                receiver = hosts["node-b"].popen(["sh", "-c", f"{sys.executable} -c '{UNPACK}' {hosts['node-b'].ip} "
                                                              f"{NC_PORT} | tar -xf - -C {unpacked} && sync -f {unpacked}"])
            time.sleep(1.0)
            started = time.perf_counter()
            hosts["node-a"].run(["sh", "-c", sender], check=True, timeout=3600)
            receiver.wait(timeout=600)
            if round_ == 0:
                tar_s = time.perf_counter() - started
                got = int(received.read_text().split()[0])
                assert got >= size, f"the baseline moved {got} bytes, not the tree's {size}"
            else:
                copy_s = time.perf_counter() - started
                got = sum(p.stat().st_size for p in unpacked.iterdir())
                assert got >= size, f"the copy wrote {got} bytes, not the tree's {size}"
                shutil.rmtree(unpacked)
            os.sync()

        # the disk's part: the same bytes written to files on B's file system and made durable
        # as a restore writes them (O_DIRECT, 1 MiB writes, fsync of each file at the end)
        floor_dir = work / "floor"
        floor_dir.mkdir()
        started = time.perf_counter()
        disk_floor(floor_dir, pool, size)
        floor_s = time.perf_counter() - started
        shutil.rmtree(floor_dir)
        os.sync()

        source = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap))
        cpu = [cpu_seconds(p.pid) for p in procs]
        started = time.perf_counter()
        create(b_ctl, "pvc-restored", size + (64 << 20), source)
        restore_s = time.perf_counter() - started
        cpu = [cpu_seconds(p.pid) - before for p, before in zip(procs, cpu)]
        started = time.perf_counter()
        create(b_ctl, "pvc-again", size + (64 << 20), source)
        again_s = time.perf_counter() - started

        mib = size / 2**20
        tar_rate, copy_rate, restore_rate, floor_rate = mib / tar_s, mib / copy_s, mib / restore_s, mib / floor_s
        print(f"cross-node restore of {args.size} ({args.driver}, two network namespaces, TLS + tokens)")
        print(f"  digest after the cut      {digest_s * 1000:9.0f} ms   (A, in the background; GetChain from B "
              "waited for it)")
        print(f"  tar -c | nc (baseline)   {tar_s * 1000:9.0f} ms   {tar_rate:7.0f} MiB/s   (B discards the bytes)")
        print(f"  ... | tar -x; sync       {copy_s * 1000:9.0f} ms   {copy_rate:7.0f} MiB/s   (a copy onto B's disk)")
        print(f"  restore on another node  {restore_s * 1000:9.0f} ms   {restore_rate:7.0f} MiB/s   "
              f"{100 * restore_rate / tar_rate:.0f}% of the baseline  goal >= 80%: "
              f"{'PASS' if restore_rate >= 0.8 * tar_rate else 'MISS'}; {100 * restore_rate / copy_rate:.0f}% of the copy")
        print(f"  disk: write + fsync      {floor_s * 1000:9.0f} ms   {floor_rate:7.0f} MiB/s   (the same bytes into files on "
              f"B's file system, no network: the restore is at {100 * restore_rate / floor_rate:.0f}% of it)")
        print(f"  CPU during the restore   A {cpu[0]:.2f} s, B {cpu[1]:.2f} s (user + system, {os.cpu_count()} cores)")
        print(f"  second restore there     {again_s * 1000:9.1f} ms   goal <= 50 ms: "
              f"{'PASS' if again_s <= 0.05 else 'MISS'}")
        return 0
    finally:
        for proc in procs:
            stop(proc)
        for channel in locals().get("channels", {}).values():
            channel.close()
        net.close()
        if "kube" in locals():
            kube.stop()
        for mp in sorted(mnt.mounts_under(work), key=lambda m: len(m.target), reverse=True):
            mnt.unmount(mp.target, detach=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
