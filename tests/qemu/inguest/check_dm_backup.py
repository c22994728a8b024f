"""Backups of devicemapper snapshots, from the user's side, on real thin pools (qemu guest only).

Three nodes in the guest: **A**, ``strata serve --driver devicemapper`` as a child process (a
loop-lvm pool of its own), the source; **B**, another devicemapper node (a second pool), and
**V**, a vfs node, both in-process plugins on their own roots and sockets, the restore sides.

* On A a 64 MiB filesystem volume (ext4 on a thin device) is published and filled with a
  known tree: modes (setuid, sticky), owners, nanosecond mtimes, user xattrs, a hard link, a
  symlink, a fifo, an empty file, an 8 MiB sparse file holding a few bytes (tests/backup's
  ``fill_base`` plus the sparse file) -> CreateSnapshot s1 -> ``strata backup push s1 --to
  oci-layout:DIR:s1``, the command a user runs (it goes through A's export socket).
* The layout is read as the OCI image-spec describes it, with json and hashlib here (no strata
  code): ``oci-layout``, ``index.json`` (tags as ``org.opencontainers.image.ref.name``), every
  blob's sha256 equal to its name, manifest and config media types, descriptor sizes, the
  config's ``rootfs.diff_ids`` equal to the sha256 of each uncompressed layer, the layer tars
  (relative names, hard link and symlink entries, the sparse file far smaller in the layer than
  its 8 MiB). Where skopeo and umoci are installed (``.ci/setup``; the guest runs the host's
  tools) ``skopeo inspect`` must agree and ``umoci raw unpack`` must give the snapshot's tree.
* Incremental: a volume made from s1 on A (a thin snapshot of it) gets files deleted
  (whiteouts), a directory deleted and one replaced (opaque or per-file whiteouts), a file
  changed, a new 1 MiB file and a new hard-link pair -> s2, whose chain is s1, s2 -> push
  again: the layout gains exactly the new layer, a config and a manifest (the bytes the
  command reports sending), and s2's manifest reuses s1's layer blob by digest; the new layer
  holds the whiteouts and none of the unchanged files.
* Restore anywhere: ``strata backup restore REF --volume-name`` on V, and CreateVolume with the
  ``oci-layout:DIR@sha256:…`` snapshot handle on B (a 64 MiB volume: its filesystem grows past
  the pool's 32 MiB base size). Both published volumes equal s2's tree byte for byte (content,
  modes, owners, mtimes, xattrs, hard links, symlinks), the deleted files are absent, and the
  sparse file's allocated blocks stay far below its 8 MiB.
* The Diff export service on A's socket against the dm snapshots: GetChain lists s1, s2 with
  the backup's diff_ids; Changes(s2, s1) names every file added, deleted and modified between
  the two trees and nothing unchanged; ExportDiff(s2, s1) (the client strata's own commands
  use) is byte for byte the backup's second layer; DiffSize(s2, s1) is its size.
* Two snapshots of the *same* volume (daily VolumeSnapshots) are siblings on devicemapper —
  the volume keeps its parent when frozen — so the second one's chain does not hold the first;
  its backup through the plugin still builds on the first one's (same ``origin`` in GetChain,
  ExportDiff against the sibling): it sends about the change and restores byte for byte.

Small on purpose (a few MiB; the guest runs under software emulation).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

TESTS = Path(__file__).resolve().parents[2]
sys.path.append(str(TESTS / "csi"))  # the CSI harness
sys.path.append(str(TESTS / "backup"))  # the backup tests' tree helpers
from backup_helpers import change_top, fill_base, tree  # noqa: E402
from check_csi_devicemapper import START_TIMEOUT_S, STORAGE_OPTS, create  # noqa: E402
from csi_harness import Harness, MiB, ServeProcess, mount_cap  # noqa: E402

from csi.proto import csi_pb2 as pb  # noqa: E402
from csi.proto import export_pb2, export_pb2_grpc  # noqa: E402
from csi.services.exportclient import ExportDiffReader  # noqa: E402

C = grpc.StatusCode
VOLUME = 64 * MiB  # above the pools' dm.basesize (32M): restores must grow to it
SPARSE = 8 * MiB
# OCI image-spec media types and annotation (image-layout.md, manifest.md, config.md)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
STRATA = Path(sys.executable).with_name("strata")  # the venv's console script


# ---------------------------------------------------------------------------- nodes


@dataclass
class Source:
    h: Harness  # strata serve (devicemapper): node A
    scratch: Path
    dm_homes: list[Path]  # every devicemapper home of the check, released after every plugin stopped

    @property
    def endpoint(self) -> list[str]:
        return ["--root", str(self.h.root), "--endpoint", f"unix://{self.h.base}/csi.sock"]

    def export_stub(self) -> export_pb2_grpc.DiffExportStub:
        return export_pb2_grpc.DiffExportStub(grpc.insecure_channel(f"unix://{self.h.base}/export.sock"))


def _harness(base: Path, driver: str, node_id: str) -> Harness:
    h = Harness(base, driver)
    h.config = replace(h.config, node_id=node_id,
                       storage_opts=STORAGE_OPTS if driver == "devicemapper" else ())
    return h


@pytest.fixture
def source(guest_scratch: Path, dm_release: Callable[[Path], None]) -> Iterator[Source]:
    """Node A. Torn down last: releasing a home removes every ``strata-`` device, so every
    plugin stops first, then every home is released."""
    a = _harness(guest_scratch / "node-a", "devicemapper", "node-a")
    serve = ServeProcess(a, guest_scratch / "serve-a.log")
    src = Source(a, guest_scratch, [a.root / "devicemapper"])
    try:
        a.stubs = serve.start(timeout=START_TIMEOUT_S)
        yield src
    finally:
        if a.stubs is not None:
            a.stubs.channel.close()
            a.stubs = None
        code = serve.terminate() if serve.proc is not None and serve.proc.poll() is None else 0
        for home in src.dm_homes:
            dm_release(home)
        assert code == 0, (guest_scratch / "serve-a.log").read_text()[-3000:]


@pytest.fixture
def restorers(source: Source) -> Iterator[tuple[Harness, Harness]]:
    """Nodes B (devicemapper, a second pool) and V (vfs), in-process plugins on their own sockets."""
    b = _harness(source.scratch / "node-b", "devicemapper", "node-b")
    v = _harness(source.scratch / "node-v", "vfs", "node-v")
    source.dm_homes.append(b.root / "devicemapper")
    try:
        b.start()
        v.start()
        yield b, v
    finally:
        v.teardown()
        b.teardown()


def strata_backup(*args: str) -> dict[str, Any]:
    """``strata backup ARGS``: the JSON answer it prints on stdout."""
    proc = subprocess.run([str(STRATA), "backup", *args, "--log-format", "json"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"strata backup {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def create_from(h: Harness, name: str, handle: str, timeout: float = 300) -> pb.Volume:
    """CreateVolume from a snapshot handle, repeated while the pull is pending (ABORTED)."""
    deadline = time.monotonic() + timeout
    source = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=handle))
    while True:
        try:
            return create(h, name, VOLUME, mount_cap(), source)
        except grpc.RpcError as exc:
            if exc.code() != C.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(1)


# ---------------------------------------------------------------------------- content


def fill_sparse(root: Path) -> None:
    """An 8 MiB file holding 6 bytes at its start and 4 KiB at 5 MiB; the rest holes."""
    with open(root / "disk.img", "wb") as f:
        f.write(b"hello\n")
        f.seek(5 * MiB)
        f.write(os.urandom(4096))
        f.truncate(SPARSE)


def change_more(root: Path) -> None:
    """Layer 2 beyond tests/backup's ``change_top``: about 1 MiB of new data, one more deletion."""
    (root / "data" / "new-mib").write_bytes(os.urandom(MiB))
    os.chmod(root / "data" / "new-mib", 0o640)
    (root / "data" / "empty").unlink()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def settled_tree(target: Path) -> dict[str, tuple]:
    os.sync()
    return tree(target)


# ---------------------------------------------------------------------------- the layout, per the image-spec


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_files(layout: Path) -> dict[str, int]:
    """Every blob of the layout: digest -> size, each checked to hash to its name."""
    out = {}
    for path in (layout / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.name, f"blob {path.name} does not hash to its name"
        out[f"sha256:{path.name}"] = len(data)
    return out


def blob(layout: Path, desc: dict[str, Any]) -> bytes:
    algo, hexdigest = desc["digest"].split(":", 1)
    assert algo == "sha256"
    data = (layout / "blobs" / algo / hexdigest).read_bytes()
    assert len(data) == desc["size"], f"descriptor size {desc['size']} != blob size {len(data)}"
    assert sha256_of(data) == desc["digest"]
    return data


@dataclass(frozen=True)
class Image:
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[bytes]  # uncompressed layer tars, oldest first


def read_image(layout: Path, tag: str) -> Image:
    """The image tagged ``tag``, every rule the image-spec gives for it checked on the way."""
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    tagged = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    assert len(tagged) == 1, f"index.json names tag {tag!r} {len(tagged)} times: {index}"
    entry = tagged[0]
    assert entry["mediaType"] == OCI_MANIFEST
    manifest = json.loads(blob(layout, entry))
    assert manifest["schemaVersion"] == 2 and manifest.get("mediaType", OCI_MANIFEST) == OCI_MANIFEST
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    config = json.loads(blob(layout, manifest["config"]))
    assert config["architecture"] and config["os"], "config.md: architecture and os are required"
    assert config["rootfs"]["type"] == "layers"
    layers = []
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert desc["mediaType"] == OCI_LAYER_TAR, "pushed without compression: plain tar layers"
        data = blob(layout, desc)
        assert sha256_of(data) == diff_id, "an uncompressed layer's diff_id is its digest"
        layers.append(data)
    return Image(entry["digest"], manifest, config, layers)


def members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        out = {m.name.rstrip("/"): m for m in tar}
    assert all(not name.startswith("/") and ".." not in name.split("/") for name in out), "relative, clean names"
    return out


def whiteout_of(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.wh.{name}" if head else f".wh.{name}"


def tools_agree(layout: Path, tag: str, image: Image, want: dict[str, tuple], scratch: Path) -> None:
    """skopeo reads the image as the layout says; umoci unpacks the snapshot's tree."""
    missing = [t for t in ("skopeo", "umoci") if shutil.which(t) is None]
    if missing:
        warnings.warn(f"{', '.join(missing)} not installed: the layout was checked with json/hashlib only")
        return
    inspected = subprocess.run(["skopeo", "inspect", f"oci:{layout}:{tag}"], capture_output=True, text=True,
                               timeout=300)
    assert inspected.returncode == 0, inspected.stderr
    facts = json.loads(inspected.stdout)
    assert facts["Digest"] == image.manifest_digest
    assert facts["Layers"] == [d["digest"] for d in image.manifest["layers"]]
    rootfs = scratch / f"umoci-{tag}"
    unpack = subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:{tag}", str(rootfs)],
                            capture_output=True, text=True, timeout=300)
    assert unpack.returncode == 0, unpack.stderr
    assert tree(rootfs) == want, "umoci's unpack differs from the snapshot"


# ---------------------------------------------------------------------------- Changes, from two trees


def expected_changes(old: dict[str, tuple], new: dict[str, tuple]) -> tuple[dict[str, int], set[str]]:
    """What Changes(new, old) must report: path -> kind for every added path, every deleted path
    whose parent survives, every non-directory whose content or metadata changed; and the
    directories that may also be reported as modified (present in both)."""
    kind = export_pb2.Change
    must = {p: kind.ADDED for p in new if p not in old}
    for p in old:
        if p not in new and (os.path.dirname(p) == "" or os.path.dirname(p) in new):
            must[p] = kind.DELETED
    for p in new:
        if p in old and not stat.S_ISDIR(new[p][0]) and new[p] != old[p]:
            must[p] = kind.MODIFIED
    dirs = {p for p in new if p in old and stat.S_ISDIR(new[p][0])}
    return must, dirs


# ---------------------------------------------------------------------------- the check


def push(src: Source, snapshot: pb.Snapshot, layout: Path, tag: str) -> dict[str, Any]:
    return strata_backup("push", snapshot.snapshot_id, "--to", f"oci-layout:{layout}:{tag}", *src.endpoint)


def test_dm_snapshots_back_up_incrementally_and_restore_anywhere(source: Source,
                                                                 restorers: tuple[Harness, Harness]) -> None:
    a, layout = source.h, source.scratch / "backups" / "vol"
    node_b, node_v = restorers

    # --- s1: a known tree on a devicemapper volume, pushed with the command
    vol = create(a, "pvc-src", VOLUME, mount_cap())
    staging, target = a.mounted(vol.volume_id, "pod-src")
    fill_base(target)
    fill_sparse(target)
    want1 = settled_tree(target)
    assert allocated(target / "disk.img") <= 64 << 10, "the source file is sparse on ext4 over dm"
    s1 = a.snapshot("snap-1", vol.volume_id)
    a.release(vol.volume_id, staging, target)
    pushed1 = push(source, s1, layout, "s1")
    assert pushed1["reference"] == f"oci-layout:{layout}@{pushed1['digest']}"

    img1 = read_image(layout, "s1")
    assert img1.manifest_digest == pushed1["digest"]
    assert img1.config["config"]["Labels"]["dev.strata.driver"] == "devicemapper"
    (layer1,) = img1.layers
    first = members(layer1)
    assert first["data/big-link"].islnk() and first["data/big-link"].linkname == "data/big" \
        or first["data/big"].islnk() and first["data/big"].linkname == "data/big-link", "one hard-link entry"
    assert first["data/cfg-link"].issym() and first["data/cfg-link"].linkname == "../etc/config"
    assert first["disk.img"].size == SPARSE
    dense = sum(v[5] for k, v in want1.items() if stat.S_ISREG(v[0]) and k not in ("disk.img", "data/big-link"))
    assert len(layer1) < dense + (256 << 10), f"a layer of {len(layer1)} bytes: the sparse file's holes were sent"
    assert not any(name.rpartition("/")[2].startswith(".wh.") for name in first), "a first layer has no whiteouts"

    # --- s2: a volume carried on from s1 (deletions, a replaced directory, ~1 MiB new), pushed again
    vol2 = create_from(a, "pvc-next", s1.snapshot_id)
    staging2, target2 = a.mounted(vol2.volume_id, "pod-next")
    assert tree(target2) == want1, "the volume made from s1 holds s1"
    change_top(target2)
    change_more(target2)
    want2 = settled_tree(target2)
    s2 = a.snapshot("snap-2", vol2.volume_id)
    a.release(vol2.volume_id, staging2, target2)
    before = blob_files(layout)
    pushed2 = push(source, s2, layout, "s2")
    after = blob_files(layout)
    assert before.items() <= after.items(), "a push never changes a stored blob"
    img2 = read_image(layout, "s2")
    assert len(img2.layers) == 2, "s2's chain is s1, s2"
    layer2_desc = img2.manifest["layers"][1]
    added = {d: s for d, s in after.items() if d not in before}
    assert set(added) == {layer2_desc["digest"], img2.manifest["config"]["digest"], img2.manifest_digest}, \
        "only the new layer, a config and a manifest are added"
    assert pushed2["bytes_sent"] == sum(added.values()), (pushed2, added)
    assert (pushed2["blobs_sent"], pushed2["blobs_skipped"]) == (1, 1)
    assert img2.manifest["layers"][0] == img1.manifest["layers"][0], "s1's layer is reused by digest"
    assert MiB < layer2_desc["size"] < MiB + (256 << 10), f"the new layer is {layer2_desc['size']} bytes for ~1 MiB"
    second = members(img2.layers[1])
    for gone in ("remove-me", "gone-dir", "data/empty"):
        assert whiteout_of(gone) in second, f"no whiteout for {gone}"
    assert "opaque/.wh..wh..opq" in second or {"opaque/.wh.old1", "opaque/.wh.old2"} <= set(second)
    assert not any(n.startswith("gone-dir/") for n in second)
    for unchanged in ("data/big", "data/big-link", "disk.img", "data/deep/er/leaf", "data/setuid"):
        assert unchanged not in second, f"{unchanged} did not change but is in the new layer"
    assert {"data/new-mib", "etc/config", "new-dir/file", "opaque/new"} <= set(second)
    tools_agree(layout, "s2", img2, want2, source.scratch)
    ref2 = pushed2["reference"]

    # --- restore on a vfs node with the command, on another devicemapper node by CreateVolume
    restored_v = strata_backup("restore", ref2, "--volume-name", "pvc-from-dm", "--root", str(node_v.root),
                               "--endpoint", f"unix://{node_v.base}/csi.sock")
    assert len(restored_v["imported"]) == 2 and restored_v["reused"] == []
    assert restored_v["bytes_pulled"] == sum(d["size"] for d in img2.manifest["layers"])
    restored_b = create_from(node_b, "pvc-from-backup", ref2)
    assert restored_b.capacity_bytes == VOLUME
    for h, volume_id, pod in ((node_v, restored_v["volume_id"], "pod-v"), (node_b, restored_b.volume_id, "pod-b")):
        r_staging, r_target = h.mounted(volume_id, pod)
        got = tree(r_target)
        assert got == want2, f"{h.driver_name}: restored tree differs: " + \
            str({k: (want2.get(k), got.get(k)) for k in want2.keys() | got.keys() if want2.get(k) != got.get(k)})
        assert not (r_target / "remove-me").exists() and not (r_target / "gone-dir").exists()
        assert allocated(r_target / "disk.img") <= 128 << 10, \
            f"{h.driver_name}: the restored sparse file holds {allocated(r_target / 'disk.img')} bytes"
        if h is node_b:
            fs = os.statvfs(r_target)
            assert fs.f_blocks * fs.f_frsize > 48 * MiB, "the restored filesystem grew to the volume's 64 MiB"
        h.release(volume_id, r_staging, r_target)

    # --- the Diff export service on A against the dm snapshots
    stub = source.export_stub()
    chain = stub.GetChain(export_pb2.GetChainRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=s2.snapshot_id)))
    assert [l.id for l in chain.layers] == [s1.snapshot_id, s2.snapshot_id] and chain.driver == "devicemapper"
    assert [l.digest for l in chain.layers] == img2.config["rootfs"]["diff_ids"]
    snap2 = export_pb2.SnapshotRef(snapshot_id=s2.snapshot_id)
    reported = {c.path.lstrip("/"): c.kind for r in stub.Changes(export_pb2.ChangesRequest(
        snapshot=snap2, base=s1.snapshot_id)) for c in r.changes}
    must, dirs = expected_changes(want1, want2)
    assert {p: reported.get(p) for p in must} == must, "Changes misses or misnames a change"
    deleted = [p for p, k in must.items() if k == export_pb2.Change.DELETED]
    extra = {p: k for p, k in reported.items() if p not in must}
    assert all(k == export_pb2.Change.MODIFIED and p in dirs  # a directory holding changes
               or k == export_pb2.Change.DELETED and any(p.startswith(d + "/") for d in deleted)
               for p, k in extra.items()), f"Changes reports what did not change: {extra}"
    reader = ExportDiffReader(stub, s2.snapshot_id, s1.snapshot_id)
    exported = b"".join(iter(lambda: reader.read(MiB), b""))
    assert exported == img2.layers[1], "ExportDiff(s2, s1) is the backup's second layer byte for byte"
    size = stub.DiffSize(export_pb2.DiffSizeRequest(snapshot=snap2, base=s1.snapshot_id)).size
    assert size == len(exported)


@pytest.fixture
def lone_node(guest_scratch: Path, dm_release: Callable[[Path], None]) -> Iterator[Harness]:
    """One devicemapper plugin in-process (cheaper to start than ``strata serve`` under emulation)."""
    h = _harness(guest_scratch / "node-d", "devicemapper", "node-d")
    try:
        yield h.start()
    finally:
        h.teardown()
        dm_release(h.root / "devicemapper")


def test_the_next_snapshot_of_a_volume_backs_up_as_the_change(lone_node: Harness, guest_scratch: Path) -> None:
    """The daily-VolumeSnapshot case: a volume snapshotted, changed, snapshotted again. On
    devicemapper the two snapshots are siblings (freeze keeps the volume's parent), so the
    second one's chain does not hold the first; ``strata backup push`` through the plugin's
    export socket still builds the second backup on the first one's (same volume: GetChain's
    ``origin``; ExportDiff(second, base=first)), so it sends about the change, and a restore
    through the plugin gives the second snapshot's tree byte for byte (its bottom layer made
    with the backup's 64 MiB capacity, above the pool's 32 MiB base size)."""
    h = lone_node
    endpoint = ["--root", str(h.root), "--endpoint", f"unix://{h.base}/csi.sock"]
    layout = guest_scratch / "backups" / "daily"
    vol = create(h, "pvc-daily", VOLUME, mount_cap())
    staging, target = h.mounted(vol.volume_id, "pod-daily")
    (target / "base").write_bytes(os.urandom(2 * MiB))
    (target / "old").write_bytes(os.urandom(64 << 10))
    settled_tree(target)
    day1 = h.snapshot("daily-1", vol.volume_id)
    (target / "new").write_bytes(os.urandom(256 << 10))
    (target / "old").unlink()
    want2 = settled_tree(target)
    day2 = h.snapshot("daily-2", vol.volume_id)
    h.release(vol.volume_id, staging, target)

    stub = export_pb2_grpc.DiffExportStub(grpc.insecure_channel(f"unix://{h.base}/export.sock"))
    chains = [stub.GetChain(export_pb2.GetChainRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=s.snapshot_id)))
              for s in (day1, day2)]
    assert [l.id for l in chains[1].layers] == [day2.snapshot_id], "siblings: day 1 is not in day 2's chain"
    assert chains[0].layers[-1].origin == chains[1].layers[-1].origin == vol.volume_id

    pushed1 = strata_backup("push", day1.snapshot_id, "--to", f"oci-layout:{layout}:day1", *endpoint)
    pushed2 = strata_backup("push", day2.snapshot_id, "--to", f"oci-layout:{layout}:day2", *endpoint)
    assert pushed1["bytes_sent"] > 2 * MiB
    assert (pushed2["blobs_sent"], pushed2["blobs_skipped"]) == (1, 1), pushed2
    assert pushed2["layers"][0] == pushed1["layers"][0], "day 1's layer is reused by digest"
    assert 256 << 10 < pushed2["bytes_sent"] < (256 << 10) + (64 << 10), \
        f"the second backup sent {pushed2['bytes_sent']} bytes for a 256 KiB change"
    img2 = read_image(layout, "day2")
    second = members(img2.layers[1])
    assert "new" in second and whiteout_of("old") in second and "base" not in second

    restored = strata_backup("restore", pushed2["reference"], "--volume-name", "pvc-daily-restored", *endpoint)
    assert len(restored["imported"]) == 2
    r_staging, r_target = h.mounted(restored["volume_id"], "pod-daily-restored")
    try:
        got = tree(r_target)
        assert got == want2, "restored tree differs: " + \
            str({k: (want2.get(k), got.get(k)) for k in want2.keys() | got.keys() if want2.get(k) != got.get(k)})
    finally:
        h.release(restored["volume_id"], r_staging, r_target)
