"""Sparse files stay sparse through a backup: an 8 MiB file holding 6 bytes (and a file with a
hole in the middle and one with nothing but a hole) make a layer of a few KiB, not 8 MiB; the
layer is read by tools nobody here wrote — umoci (Go's archive/tar) after a ``skopeo copy``
through a real registry, GNU tar, Python's tarfile — to the same content; and a restore on a
fresh root writes the data segments only (``st_blocks`` stays small)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from backup_helpers import make_driver, need, run, snapshot_tree, tree
from csi.backup import backup, restore
from csi.backup.layout import LayoutTarget
from csi.backup.media import LAYER_TAR

MIB = 1 << 20
SPARSE_FILES = {"disk.img": 8 * MIB, "middle.db": 8 * MIB, "hole-only": 4 * MIB}


def _fill_sparse(root: Path) -> None:
    with open(root / "disk.img", "wb") as f:
        f.write(b"hello\n")
        f.truncate(8 * MIB)
    with open(root / "middle.db", "wb") as f:  # data at 0, in the middle, and the last byte
        f.write(b"head")
        f.seek(3 * MIB + 123)
        f.write(os.urandom(10_000))
        f.seek(8 * MIB - 1)
        f.write(b"$")
    with open(root / "hole-only", "wb") as f:
        f.truncate(4 * MIB)
    (root / "dense").write_bytes(os.urandom(50_000))
    os.link(root / "disk.img", root / "zz-disk-link")


def _sparse_snapshot(drv) -> str:
    drv.create("sv")
    _fill_sparse(drv.get("sv"))
    drv.put("sv")
    drv.freeze("sv", "ss")
    drv.remove("sv")
    return "ss"


def _blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_sparse_layer_is_small_and_every_reader_unpacks_it(driver, registry, tmp_path: Path) -> None:
    need("umoci")
    need("skopeo")
    snap = _sparse_snapshot(driver)
    want = snapshot_tree(driver, snap)
    layout = tmp_path / "layout"
    result = backup(driver, snap, LayoutTarget(layout, create=True), tag="v1")
    (layer,) = result.layers
    assert layer.blob.media_type == LAYER_TAR
    assert layer.blob.size < 96 * 1024, f"a layer of {layer.blob.size} bytes for 16 KiB of data"
    blob = layout / "blobs" / "sha256" / layer.blob.digest.split(":")[1]

    # Python's tarfile: PAX 1.0 sparse members with their maps, read back to the content
    with tarfile.open(blob) as tar:
        members = {m.name: m for m in tar}
        for name, size in SPARSE_FILES.items():
            assert members[name].sparse is not None and members[name].size == size
        assert members["dense"].sparse is None and members["zz-disk-link"].islnk()
        assert tar.extractfile(members["disk.img"]).read() == b"hello\n" + bytes(8 * MIB - 6)

    # GNU tar extracts it sparse
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    run("tar", "-x", "--xattrs", "--xattrs-include=user.*", "--numeric-owner", "-f", str(blob), "-C", str(gnu))
    assert tree(gnu) == want
    assert _blocks(gnu / "disk.img") <= 64 * 1024

    # through a real registry and back with skopeo, then umoci (Go's archive/tar) unpacks it
    src = f"oci:{layout}:v1"
    run("skopeo", "copy", "--dest-tls-verify=false", src, f"docker://{registry.host}/sparse/vol:v1")
    run("skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/sparse/vol:v1",
        f"oci:{tmp_path / 'pulled'}:v1")
    for image in (f"{layout}:v1", f"{tmp_path / 'pulled'}:v1"):
        rootfs = tmp_path / ("rootfs-" + image.rsplit("/", 1)[1].replace(":", "-"))
        run("umoci", "raw", "unpack", "--image", image, str(rootfs))
        assert tree(rootfs) == want

    # a restore on a fresh root punches the holes again
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        got = restore(other, LayoutTarget(layout), result.manifest_digest)
        root = other.get(got.layer_id)
        try:
            assert tree(root) == want
            assert _blocks(root / "disk.img") <= 64 * 1024
            assert _blocks(root / "hole-only") == 0
            assert _blocks(root / "middle.db") <= 128 * 1024
        finally:
            other.put(got.layer_id)
    finally:
        other.cleanup()


def test_sparse_diff_bytes_are_deterministic_and_sized(driver) -> None:
    snap = _sparse_snapshot(driver)
    streams = []
    for _ in range(2):
        with driver.diff(snap) as stream:
            streams.append(stream.read())
    assert streams[0] == streams[1]
    assert driver.diff_size(snap) == len(streams[0]) < 96 * 1024
