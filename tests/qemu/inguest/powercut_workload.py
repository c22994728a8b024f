"""The guest side of the power-cut lane (driven by :mod:`tests.qemu.powercut`, one boot each run).

Every boot, for each driver at once (one thread each): start ``strata serve`` on that
driver's root on the strata disk (the guest's ``/var/tmp``, a virtio disk the host keeps
between boots), let its start-up recovery run, **verify** what is on disk against the
driver's journal, write ``verify-<driver>-<boot>.json`` to the exchange directory, then
(unless ``--final``) run a random **workload** over the CSI socket until the host cuts the
power: create, stage, publish, write + fsync files, snapshot, restore, clone, unpublish,
unstage, delete.

Journal (``journal-<driver>.jsonl`` in the exchange directory, 9p: a write returns once
qemu wrote the host file, so it survives the kill): a ``begin`` line before each call and
an ``ack`` line after its answer (a file write is acknowledged after ``fsync`` of the file
and its directory). What a ``begin`` line carries lets the verifier know the expected
content (the files a snapshot, restore or clone must hold). The verifier settles every
call left without ``ack``: an object it finds is adopted (``adopt`` line), one it does not
is forgotten — either is fine (finished or rolled back), a half state is not.

Checks after each cut (errors, never exceptions, so one driver's failure does not hide another's):
* every acknowledged volume and snapshot is listed, nothing else is (deleted ones gone);
* every acknowledged fsynced file reads back byte for byte (restores: the snapshot's files,
  clones: the source's); one snapshot per boot is restored again and read;
* CSI records all ``ready``; layer records all ``ready``, visible layers = the volumes' and
  snapshots' layers, hidden layers have children; the layers on disk = the layer records
  (no orphan directory / subvolume / thin-device marker, no leftover temporary);
* mounts under the kubelet directory = the ``ready`` publications; acknowledged stagings
  and publications are mounted again.

Only the CSI stubs and sqlite are imported here (Python is slow under emulation, and the
driver modules are private to strata).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc

BASE = Path("/var/tmp/pc")  # on the strata disk (init.sh mounts /dev/vda there)
XCHG = Path("/tmp/xchg")
NODE = "pc-node"
MiB = 1 << 20
DRIVERS = ("vfs", "overlay", "btrfs", "devicemapper")
DM_OPTS = ("dm.loopback=true", "dm.loopdatasize=1G", "dm.loopmetadatasize=32M", "dm.basesize=32M",
           "dm.min_free_space=5")
SERVE_TIMEOUT_S = 400
MAX_VOLUMES, MAX_SNAPSHOTS = 5, 3
CAP = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                          access_mode=pb.VolumeCapability.AccessMode(
                              mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mount_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4]
            out.append(target.encode().decode("unicode_escape"))  # \040 etc.
    return out


def mounted_under(path: Path) -> set[str]:
    prefix = str(path).rstrip("/") + "/"
    return {m for m in mount_points() if m.startswith(prefix)}


# ---------------------------------------------------------------- per-driver places


@dataclass
class Place:
    driver: str
    base: Path
    root: Path
    kubelet: Path
    sock: Path

    @classmethod
    def of(cls, driver: str) -> Place:
        base = BASE / driver
        root = (BASE / "btrfs-mnt" / "root") if driver == "btrfs" else base / "root"
        return cls(driver, base, root, base / "kubelet", base / "csi.sock")

    @property
    def home(self) -> Path:
        return self.root / self.driver

    def staging(self, vol: str) -> Path:
        return self.kubelet / "plugins" / "kubernetes.io" / "csi" / vol / "globalmount"

    def target(self, vol: str) -> Path:
        return self.kubelet / "pods" / f"pod-{vol}" / "volumes" / "kubernetes.io~csi" / vol / "mount"


def prepare_disk(drivers: list[str]) -> None:
    """Directories (first boot) and the btrfs filesystem (a loop file on the strata disk)."""
    BASE.mkdir(parents=True, exist_ok=True)
    for d in drivers:
        Place.of(d).kubelet.mkdir(parents=True, exist_ok=True)
    if "btrfs" in drivers:
        image, mnt = BASE / "btrfs.img", BASE / "btrfs-mnt"
        if not image.exists():
            tmp = BASE / "btrfs.img.tmp"
            with open(tmp, "wb") as f:
                f.truncate(1 << 30)
            subprocess.run(["mkfs.btrfs", "-q", "-f", str(tmp)], check=True)
            fsync_path(tmp)
            tmp.rename(image)
            fsync_path(BASE)
        mnt.mkdir(exist_ok=True)
        loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                              text=True).stdout.strip()
        subprocess.run(["mount", "-t", "btrfs", loop, str(mnt)], check=True)
        (mnt / "root").mkdir(exist_ok=True)


# ---------------------------------------------------------------- journal and model


class Journal:
    def __init__(self, path: Path, boot: int) -> None:
        self.path, self.boot = path, boot
        self.lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = []
        for raw in self.path.read_text().splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:  # a line cut by the power cut
                continue
        return lines

    def write(self, **entry: Any) -> None:
        entry["b"] = self.boot
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class Vol:
    name: str
    id: str
    files: dict[str, str]  # fsynced file -> sha256
    src: str = ""  # "", "snap:<name>" (restore) or "vol:<name>" (clone)
    staged: bool = False
    published: bool = False


@dataclass
class Snap:
    name: str
    id: str
    files: dict[str, str]


@dataclass
class Model:
    vols: dict[str, Vol] = field(default_factory=dict)
    snaps: dict[str, Snap] = field(default_factory=dict)
    gone_vols: set[str] = field(default_factory=set)  # acknowledged deletes (IDs)
    gone_snaps: set[str] = field(default_factory=set)
    pending: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (op, name) -> begin line
    srcs: dict[str, str] = field(default_factory=dict)  # volume name -> source ("", snap:X, vol:X)
    counter: int = 0

    @classmethod
    def replay(cls, lines: list[dict[str, Any]]) -> Model:
        m = cls()
        for e in lines:
            op, ph, name = e.get("op"), e.get("ph"), e.get("name", "")
            m.counter = max(m.counter, e.get("n", 0))
            if ph == "begin":
                m.pending[(op, name)] = e
                if op == "create":
                    m.srcs[name] = e.get("src", "")
                continue
            m.pending.pop((op, name), None)
            if ph == "forget":
                continue
            if op == "create":
                m.vols[name] = Vol(name, e["id"], dict(e["files"]), m.srcs.get(name, ""))
            elif op == "snapshot":
                m.snaps[name] = Snap(name, e["id"], dict(e["files"]))
            elif op == "write" and name in m.vols:
                m.vols[name].files[e["file"]] = e["sha"]
            elif op in ("stage", "unstage") and name in m.vols:
                m.vols[name].staged = op == "stage"
            elif op in ("publish", "unpublish") and name in m.vols:
                m.vols[name].published = op == "publish"
            elif op == "delvol" and name in m.vols:
                m.gone_vols.add(m.vols.pop(name).id)
            elif op == "delsnap" and name in m.snaps:
                m.gone_snaps.add(m.snaps.pop(name).id)
        return m


# ---------------------------------------------------------------- strata serve


class Server:
    def __init__(self, place: Place, boot: int) -> None:
        self.place, self.boot = place, boot
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = place.base / f"serve-{boot}.log"

    def start(self) -> None:
        strata = Path(sys.executable).with_name("strata")
        cmd = [str(strata)] if strata.exists() else [sys.executable, "-m", "csi.cli"]
        cmd += ["serve", "--endpoint", f"unix://{self.place.sock}", "--node-id", NODE, "--root", str(self.place.root),
                "--driver", self.place.driver, "--grace", "5"]
        if self.place.driver == "devicemapper":
            cmd += [f"--storage-opt={o}" for o in DM_OPTS]
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's strata, whatever the venv points at
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)

    def wait_ready(self) -> rpc.ControllerStub:
        assert self.proc is not None
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.place.sock))
                    break
                except OSError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"strata serve did not start (exit {self.proc.poll()}): {self.log_tail()}")
            time.sleep(0.1)
        channel = grpc.insecure_channel(f"unix://{self.place.sock}")
        grpc.channel_ready_future(channel).result(timeout=60)
        return channel

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2500:]
        except OSError:
            return ""


# ---------------------------------------------------------------- one driver


class Runner:
    def __init__(self, driver: str, boot: int, seed: int) -> None:
        self.place = Place.of(driver)
        self.boot = boot
        self.journal = Journal(XCHG / f"journal-{driver}.jsonl", boot)
        self.server = Server(self.place, boot)
        self.rng = random.Random(seed * 1000 + boot * 10 + DRIVERS.index(driver))
        self.errors: list[str] = []
        self.stats: dict[str, int] = {}
        self.model = Model()
        self.ctl: rpc.ControllerStub | None = None
        self.node: rpc.NodeStub | None = None

    # ------------------------------------------------------------ helpers

    def error(self, message: str) -> None:
        self.errors.append(message)
        self.journal.write(op="error", ph="error", msg=message[:2000])

    def next_name(self, kind: str) -> str:
        self.model.counter += 1
        return f"{kind}{self.model.counter}b{self.boot}"  # the boot keeps names unique across cuts

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def query(self, path: Path, *sql: str) -> list[list[tuple[Any, ...]]]:
        """Read-only queries (the server keeps the database open; WAL lets us read)."""
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return [con.execute(q).fetchall() for q in sql]
        finally:
            con.close()

    def csi_rows(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        vols, snaps, pubs = self.query(self.place.root / "state.db",
                                       "SELECT name, layer, state, base_layer FROM volumes",
                                       "SELECT name, layer, state FROM snapshots",
                                       "SELECT layer, kind, path, state FROM publications")
        return vols, snaps, pubs

    def layer_rows(self) -> list[tuple[Any, ...]]:
        return self.query(self.place.home / "layers.db", "SELECT id, parent, state, hidden FROM layers")[0]

    def on_disk_layers(self) -> tuple[set[str], list[str]]:
        """Layer IDs present on disk, and leftovers that no layer should leave."""
        home, d = self.place.home, self.place.driver

        def names(p: Path) -> list[str]:
            return sorted(os.listdir(p)) if p.is_dir() else []

        if d == "vfs":
            return set(names(home / "dir")), [f"tmp/{n}" for n in names(home / "tmp")]
        if d == "overlay":
            layers = set(names(home / "layers"))
            dangling = [f"l/{n}" for n in names(home / "l") if not (home / "l" / n).exists()]
            return layers, dangling
        if d == "btrfs":
            found = names(home / "subvolumes")
            return {n for n in found if not n.startswith(".")}, [n for n in found if n.startswith(".")]
        return set(names(home / "mnt")), []

    # ------------------------------------------------------------ CSI calls (journaled)

    def call_create(self, name: str, files: dict[str, str], source: pb.VolumeContentSource | None,
                    src: str) -> Vol | None:
        self.journal.write(op="create", ph="begin", name=name, files=files, src=src, n=self.model.counter)
        assert self.ctl is not None
        got = self.ctl.CreateVolume(pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=32 * MiB), volume_capabilities=[CAP],
            volume_content_source=source), timeout=300).volume
        self.journal.write(op="create", ph="ack", name=name, id=got.volume_id, files=files)
        vol = Vol(name, got.volume_id, dict(files), src)
        self.model.vols[name] = vol
        self.count("create")
        return vol

    def call_snapshot(self, vol: Vol) -> Snap:
        name = self.next_name("s")
        self.journal.write(op="snapshot", ph="begin", name=name, vol=vol.name, files=vol.files, n=self.model.counter)
        assert self.ctl is not None
        got = self.ctl.CreateSnapshot(pb.CreateSnapshotRequest(name=name, source_volume_id=vol.id),
                                      timeout=300).snapshot
        self.journal.write(op="snapshot", ph="ack", name=name, id=got.snapshot_id, files=vol.files)
        snap = Snap(name, got.snapshot_id, dict(vol.files))
        self.model.snaps[name] = snap
        self.count("snapshot")
        return snap

    def call_stage(self, vol: Vol) -> None:
        assert self.node is not None
        if not vol.staged:
            staging = self.place.staging(vol.name)
            staging.parent.mkdir(parents=True, exist_ok=True)
            self.journal.write(op="stage", ph="begin", name=vol.name)
            self.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=vol.id, staging_target_path=str(staging), volume_capability=CAP), timeout=300)
            vol.staged = True
            self.journal.write(op="stage", ph="ack", name=vol.name)
        if not vol.published:
            target = self.place.target(vol.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.journal.write(op="publish", ph="begin", name=vol.name)
            self.node.NodePublishVolume(pb.NodePublishVolumeRequest(
                volume_id=vol.id, staging_target_path=str(self.place.staging(vol.name)), target_path=str(target),
                volume_capability=CAP), timeout=300)
            vol.published = True
            self.journal.write(op="publish", ph="ack", name=vol.name)
            self.count("publish")

    def call_release(self, vol: Vol) -> None:
        assert self.node is not None
        if vol.published:
            self.journal.write(op="unpublish", ph="begin", name=vol.name)
            self.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
                volume_id=vol.id, target_path=str(self.place.target(vol.name))), timeout=300)
            vol.published = False
            self.journal.write(op="unpublish", ph="ack", name=vol.name)
        if vol.staged:
            self.journal.write(op="unstage", ph="begin", name=vol.name)
            self.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
                volume_id=vol.id, staging_target_path=str(self.place.staging(vol.name))), timeout=300)
            vol.staged = False
            self.journal.write(op="unstage", ph="ack", name=vol.name)
            self.count("unstage")

    def call_delete_volume(self, vol: Vol) -> None:
        self.call_release(vol)
        self.journal.write(op="delvol", ph="begin", name=vol.name)
        assert self.ctl is not None
        self.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id), timeout=300)
        self.journal.write(op="delvol", ph="ack", name=vol.name)
        self.model.gone_vols.add(self.model.vols.pop(vol.name).id)
        self.count("delete_volume")

    def call_delete_snapshot(self, snap: Snap) -> None:
        self.journal.write(op="delsnap", ph="begin", name=snap.name)
        assert self.ctl is not None
        self.ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.id), timeout=300)
        self.journal.write(op="delsnap", ph="ack", name=snap.name)
        self.model.gone_snaps.add(self.model.snaps.pop(snap.name).id)
        self.count("delete_snapshot")

    def write_files(self, vol: Vol) -> None:
        self.call_stage(vol)
        target = self.place.target(vol.name)
        sub = target / f"d{self.rng.randrange(3)}"
        sub.mkdir(exist_ok=True)
        fsync_path(target)
        for _ in range(self.rng.randint(1, 3)):
            rel = f"{sub.name}/f{self.next_name('')}-{self.boot}"
            data = os.urandom(self.rng.choice((1, 7, 64, 300)) * 1024 + self.rng.randrange(512))
            fd = os.open(target / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_path(sub)
            vol.files[rel] = sha(data)
            self.journal.write(op="write", ph="ack", name=vol.name, file=rel, sha=sha(data))
            self.count("fsynced_file")
        # written and never fsynced: no promise about it
        (target / f"nosync-{self.next_name('')}-{self.boot}").write_bytes(os.urandom(4096))

    def check_content(self, vol: Vol, what: str) -> None:
        """Every fsynced file of ``vol`` reads back byte for byte (publishing it if needed)."""
        self.call_stage(vol)
        target = self.place.target(vol.name)
        origin = {"": "empty volume", "snap": "restore of", "vol": "clone of"}[vol.src.split(":")[0]]
        who = f"{vol.name} ({vol.id}, {origin} {vol.src.partition(':')[2]})".replace(" )", ")")
        for rel, digest in sorted(vol.files.items()):
            try:
                data = (target / rel).read_bytes()
            except OSError as exc:
                self.error(f"{what}: {who} lost fsynced file {rel}: {exc}")
                continue
            if sha(data) != digest:
                zeros = " (all zeros)" if not data.strip(b"\0") else ""
                self.error(f"{what}: {who} file {rel} has other bytes than were fsynced{zeros}")
        self.count("content_checks")

    # ------------------------------------------------------------ verification

    def settle_pending(self) -> None:
        """Calls the last boot left without an answer: adopt what exists, forget the rest."""
        vols, snaps, pubs = self.csi_rows()
        vol_rows = {r[0]: r for r in vols}
        snap_rows = {r[0]: r for r in snaps}
        undoing = {name for (op, name) in self.model.pending if op in ("unstage", "unpublish", "delvol")}
        for (op, name), begin in sorted(self.model.pending.items(), key=lambda kv: str(kv[0])):
            if op == "create":
                row = vol_rows.get(name)
                if row is not None:
                    vol = Vol(name, f"{row[1]}@{NODE}", dict(begin["files"]), begin.get("src", ""))
                    self.model.vols[name] = vol
                    self.journal.write(op="create", ph="adopt", name=name, id=vol.id, files=vol.files)
                    self.count("adopted_create")
                else:
                    self.journal.write(op="create", ph="forget", name=name)
                    self.count("rolled_back_create")
            elif op == "snapshot":
                row = snap_rows.get(name)
                if row is not None:
                    snap = Snap(name, f"{row[1]}@{NODE}", dict(begin["files"]))
                    self.model.snaps[name] = snap
                    self.journal.write(op="snapshot", ph="adopt", name=name, id=snap.id, files=snap.files)
                    self.count("adopted_snapshot")
                else:
                    self.journal.write(op="snapshot", ph="forget", name=name)
                    self.count("rolled_back_snapshot")
            elif op == "delvol" and name in self.model.vols:
                if name in vol_rows:
                    self.journal.write(op="delvol", ph="forget", name=name)  # still there: a live volume
                else:
                    self.model.gone_vols.add(self.model.vols.pop(name).id)
                    self.journal.write(op="delvol", ph="adopt", name=name)
            elif op == "delsnap" and name in self.model.snaps:
                if name in snap_rows:
                    self.journal.write(op="delsnap", ph="forget", name=name)
                else:
                    self.model.gone_snaps.add(self.model.snaps.pop(name).id)
                    self.journal.write(op="delsnap", ph="adopt", name=name)
            else:
                self.journal.write(op=op, ph="forget", name=name)
        self.model.pending.clear()
        # publications: what recovery kept is what is staged/published now
        layer_of = {v.id.split("@")[0]: v for v in self.model.vols.values()}
        kept = {(r[0], r[1]) for r in pubs if r[3] == "ready"}
        for layer, vol in layer_of.items():
            staged, published = (layer, "stage") in kept, (layer, "publish") in kept
            if vol.staged and not staged and vol.name not in undoing:
                self.error(f"acknowledged staging of {vol.name} ({vol.id}) is gone after the cut")
            if vol.published and not published and vol.name not in undoing:
                self.error(f"acknowledged publication of {vol.name} ({vol.id}) is gone after the cut")
            if (staged, published) != (vol.staged, vol.published):
                self.journal.write(op="stage" if staged else "unstage", ph="adopt", name=vol.name)
                self.journal.write(op="publish" if published else "unpublish", ph="adopt", name=vol.name)
            vol.staged, vol.published = staged, published

    def check_records(self) -> None:
        vols, snaps, pubs = self.csi_rows()
        for kind, rows in (("volume", vols), ("snapshot", snaps)):
            for row in rows:
                if row[2] != "ready":
                    self.error(f"{kind} record {row[0]} ({row[1]}) is {row[2]!r} after start-up recovery")
        for layer, kind, path, state in pubs:
            if state != "ready":
                self.error(f"publication record {kind} {path} of {layer} is {state!r} after recovery")
        assert self.ctl is not None
        listed_vols = {e.volume.volume_id for e in self.ctl.ListVolumes(pb.ListVolumesRequest(), timeout=120).entries}
        listed_snaps = {e.snapshot.snapshot_id for e in
                        self.ctl.ListSnapshots(pb.ListSnapshotsRequest(), timeout=120).entries}
        want_vols = {v.id for v in self.model.vols.values()}
        want_snaps = {s.id for s in self.model.snaps.values()}
        for vid in sorted(want_vols - listed_vols):
            self.error(f"acknowledged volume {vid} is not listed after the cut")
        for vid in sorted(listed_vols - want_vols):
            why = "a deleted volume came back" if vid in self.model.gone_vols else "an unknown volume"
            self.error(f"{why}: {vid} is listed")
        for sid in sorted(want_snaps - listed_snaps):
            self.error(f"acknowledged snapshot {sid} is not listed after the cut")
        for sid in sorted(listed_snaps - want_snaps):
            why = "a deleted snapshot came back" if sid in self.model.gone_snaps else "an unknown snapshot"
            self.error(f"{why}: {sid} is listed")
        # layer records and what is on disk
        layers = self.layer_rows()
        ids = {r[0] for r in layers}
        for lid, _parent, state, _hidden in layers:
            if state != "ready":
                self.error(f"layer record {lid} is {state!r} after recovery")
        visible = {r[0] for r in layers if not r[3]}
        wanted = {r[1] for r in vols} | {r[1] for r in snaps}
        for lid in sorted(visible - wanted):
            self.error(f"layer {lid} has a record but no volume or snapshot (leak)")
        for lid in sorted(wanted - ids):
            self.error(f"volume/snapshot layer {lid} has no layer record")
        parents = {r[1] for r in layers}
        for lid, _p, _s, hidden in layers:
            if hidden and lid not in parents:
                self.error(f"hidden layer {lid} has no children (should have been freed)")
        disk, leftovers = self.on_disk_layers()
        for lid in sorted(disk - ids):
            self.error(f"orphan layer on disk: {lid} (no record)")
        for lid in sorted(ids - disk):
            self.error(f"layer record {lid} has nothing on disk")
        for extra in leftovers:
            self.error(f"leftover on disk after recovery: {extra}")
        # mounts
        ready_paths = {r[2] for r in pubs if r[3] == "ready"}
        mounted = mounted_under(self.place.kubelet)
        for path in sorted(mounted - ready_paths):
            self.error(f"stray mount {path}")
        for path in sorted(ready_paths - mounted):
            self.error(f"publication {path} is not mounted after recovery")

    def verify(self) -> None:
        self.model = Model.replay(self.journal.read())
        self.settle_pending()
        self.check_records()
        for vol in list(self.model.vols.values()):
            self.check_content(vol, "after the cut")
        snaps = sorted(self.model.snaps.values(), key=lambda s: s.name)
        if snaps:  # read one snapshot back through a restore, then delete the restore
            snap = self.rng.choice(snaps)
            vol = self.call_create(self.next_name("v"), snap.files,
                                   pb.VolumeContentSource(snapshot={"snapshot_id": snap.id}), f"snap:{snap.name}")
            if vol is not None:
                self.check_content(vol, f"restore of snapshot {snap.name} after the cut")
                self.call_delete_volume(vol)

    # ------------------------------------------------------------ workload

    def step(self) -> None:
        m, rng = self.model, self.rng
        vols, snaps = sorted(m.vols.values(), key=lambda v: v.name), sorted(m.snaps.values(), key=lambda s: s.name)
        choices = ["write"] * 4 + ["snapshot"] * 2 + ["restore", "clone", "release", "delsnap", "delvol"]
        op = rng.choice(choices)
        if len(vols) < 2 or (op in ("restore", "clone") and len(vols) >= MAX_VOLUMES):
            op = "create" if len(vols) < MAX_VOLUMES else "delvol"
        if op == "snapshot" and len(snaps) >= MAX_SNAPSHOTS:
            op = "delsnap"
        if op == "restore" and not snaps:
            op = "snapshot"
        if op == "create":
            self.call_create(self.next_name("v"), {}, None, "")
        elif op == "write":
            self.write_files(rng.choice(vols))
        elif op == "snapshot":
            self.call_snapshot(rng.choice(vols))
        elif op == "restore":
            snap = rng.choice(snaps)
            vol = self.call_create(self.next_name("v"), snap.files,
                                   pb.VolumeContentSource(snapshot={"snapshot_id": snap.id}), f"snap:{snap.name}")
            if vol is not None:
                self.check_content(vol, f"restore of {snap.name}")
        elif op == "clone":
            src = rng.choice(vols)
            vol = self.call_create(self.next_name("v"), src.files,
                                   pb.VolumeContentSource(volume={"volume_id": src.id}), f"vol:{src.name}")
            if vol is not None:
                self.check_content(vol, f"clone of {src.name}")
        elif op == "release":
            self.call_release(rng.choice(vols))
        elif op == "delsnap" and snaps:
            self.call_delete_snapshot(rng.choice(snaps))
        elif op == "delvol":
            self.call_delete_volume(rng.choice(vols))

    # ------------------------------------------------------------ the boot

    def run(self, final: bool) -> None:
        started = time.monotonic()
        result: dict[str, Any] = {"driver": self.place.driver, "boot": self.boot}
        try:
            self.server.start()
            channel = self.server.wait_ready()
            result["serve_start_s"] = round(time.monotonic() - started, 1)
            self.ctl, self.node = rpc.ControllerStub(channel), rpc.NodeStub(channel)
            self.verify()
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            self.error(f"verification stopped: {exc!r}\n{traceback.format_exc()[-2000:]}")
        result.update(ok=not self.errors, errors=self.errors, stats=dict(self.stats),
                      verify_s=round(time.monotonic() - started, 1),
                      volumes=len(self.model.vols), snapshots=len(self.model.snaps))
        if self.errors:
            result["serve_log"] = self.server.log_tail()
        out = XCHG / f"verify-{self.place.driver}-{self.boot}.json"
        out.write_text(json.dumps(result, indent=1))
        fsync_path(out)
        if final or self.ctl is None:
            self.server.stop()
            return
        self.errors = []
        self.stats = {}
        while True:  # until the power goes
            try:
                self.step()
            except grpc.RpcError as exc:
                self.error(f"workload call failed: {exc.code()} {exc.details()}")
                time.sleep(1)
            except Exception as exc:  # noqa: BLE001
                self.error(f"workload step failed: {exc!r}\n{traceback.format_exc()[-1500:]}")
                time.sleep(1)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--boot", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drivers", default=",".join(DRIVERS))
    ap.add_argument("--final", action="store_true")
    args = ap.parse_args(argv)
    drivers = [d for d in args.drivers.split(",") if d]
    prepare_disk(drivers)
    runners = [Runner(d, args.boot, args.seed) for d in drivers]
    threads = [threading.Thread(target=r.run, args=(args.final,), daemon=True) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0 if all(not r.errors for r in runners) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
