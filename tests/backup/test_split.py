"""Large diffs split into several layers (``backup(..., max_layer_bytes=...)``): cut on file
boundaries, whiteouts and opaque markers in the first part, hard links kept with their first
path, directory entries repeated where a later part adds to them; restore applies the parts in
order and umoci unpacks the same tree; a second backup skips the parts (export cache)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from backup_helpers import make_chain, make_driver, need, run, snapshot_tree, tree
from csi.backup import ExportIndex, backup, restore
from csi.backup.layout import LayoutTarget
from csi.backup.split import part_streams, plan_parts
from csi.errors import InvalidArgument
from csi.graphdriver.diff.ocitar import LayerTarWriter
from csi.graphdriver.diff.whiteouts import MemberKind, classify

LIMIT = 96 << 10


def _members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(blob) as tar:
        return list(tar)


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _add_bulk(drv, snap: str) -> str:
    """A third layer with many files (several parts' worth), a hard-link group and a deletion."""
    drv.create("v2", snap)
    root = drv.get("v2")
    (root / "bulk").mkdir()
    for i in range(12):
        (root / "bulk" / f"f{i:02d}").write_bytes(os.urandom(30_000))
    os.link(root / "bulk" / "f00", root / "bulk" / "f00-link")
    (root / "etc" / "config").unlink()
    drv.put("v2")
    drv.freeze("v2", "s2")
    drv.remove("v2")
    return "s2"


def test_split_backup_restores_in_order_and_umoci_unpacks_it(driver, tmp_path: Path) -> None:
    need("umoci")
    _, s1 = make_chain(driver)
    s2 = _add_bulk(driver, s1)
    whole = backup(driver, s2, LayoutTarget(tmp_path / "whole", create=True), tag="v")
    layout = tmp_path / "split"
    index = ExportIndex(tmp_path / "index.json")
    result = backup(driver, s2, LayoutTarget(layout, create=True), tag="v", max_layer_bytes=LIMIT, index=index)
    assert len(whole.layers) == 3 and len(result.layers) > 4  # the 300 KB layer and the bulk layer split
    layer_ids = [l.layer_id for l in result.layers]
    assert layer_ids[0] != layer_ids[-1] and len(set(layer_ids)) == 3
    by_layer: dict[str, list[Path]] = {}
    for facts in result.layers:
        assert facts.blob.size <= LIMIT or facts.blob.size <= 310_000 + 12288  # only a lone big file goes over
        by_layer.setdefault(facts.layer_id, []).append(_blob(layout, facts.blob.digest))
    for parts in by_layer.values():
        for later in parts[1:]:  # markers only ever in the first part of a layer
            assert all(classify(m.name).kind is MemberKind.ENTRY for m in _members(later))
        names = [[m.name for m in _members(p)] for p in parts]
        links = [(i, m.linkname) for i, p in enumerate(parts) for m in _members(p) if m.islnk()]
        for i, target in links:  # a hard link's first path lies in the same part
            assert target in names[i]
    whole_top = _members(_blob(tmp_path / "whole", whole.layers[-1].blob.digest))
    markers = {m.name for m in whole_top if classify(m.name).kind is not MemberKind.ENTRY}
    assert markers and markers <= {m.name for m in _members(by_layer[s2][0])}  # all in the first part
    # umoci applies the parts as layers, in order: the same tree as the snapshot
    run("umoci", "raw", "unpack", "--image", f"{layout}:v", str(tmp_path / "rootfs"))
    assert tree(tmp_path / "rootfs") == snapshot_tree(driver, s2)
    # restore applies them in order on another node
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        got = restore(other, LayoutTarget(layout), result.manifest_digest)
        assert len(got.imported) == len(result.layers)
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s2)
    finally:
        other.cleanup()
    # a second backup with the export cache skips every part without re-reading the diff
    again = backup(driver, s2, LayoutTarget(layout), tag="v2", max_layer_bytes=LIMIT, index=index)
    assert again.blobs_sent == 0 and again.blobs_skipped == len(result.layers)
    assert again.manifest_digest == result.manifest_digest or [l.blob for l in again.layers] == [
        l.blob for l in result.layers]


def _tar_of(entries: list[tuple[str, bytes | None]], links: dict[str, str] | None = None) -> bytes:
    """A layer tar written by the codec from a tree made here."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        root = Path(d)
        out = io.BytesIO()
        with LayerTarWriter(out) as writer:
            for name, data in entries:
                path = root / name
                if data is None:
                    path.mkdir()
                elif name in (links or {}):
                    os.link(root / (links or {})[name], path)
                else:
                    path.write_bytes(data)
            for name, _ in entries:
                writer.add(root / name, name)
        return out.getvalue()


def test_a_hard_link_group_keeps_a_part_together_and_says_why() -> None:
    data = _tar_of([("d", None), ("d/a", os.urandom(20_000)), ("d/b", os.urandom(20_000)),
                    ("d/c", os.urandom(20_000)), ("d/z", b"")], links={"d/z": "d/a"})
    parts = plan_parts(io.BytesIO(data), 40_960)
    (group,) = [p for p in parts if any(u.link for u in p.units)]
    assert [u.name for u in group.units] == ["d", "d/a", "d/b", "d/c", "d/z"] and group.size > 60_000
    assert "hard-link group" in group.oversized
    # the parts, read back, are complete tars whose members add up to the whole
    streams = [s.read() for s in part_streams(io.BytesIO(data), parts)]
    names = [m.name for s in streams for m in tarfile.open(fileobj=io.BytesIO(s))]
    whole = [m.name for m in tarfile.open(fileobj=io.BytesIO(data))]
    assert [n for n in names if n != "d"] == [n for n in whole if n != "d"]
    assert all(len(s) % tarfile.RECORDSIZE == 0 for s in streams)


def test_later_parts_repeat_the_directories_they_add_to() -> None:
    data = _tar_of([("d", None), ("d/a", os.urandom(20_000)), ("d/b", os.urandom(20_000))])
    parts = plan_parts(io.BytesIO(data), 40_960)
    assert len(parts) == 2
    streams = [s.read() for s in part_streams(io.BytesIO(data), parts)]
    second = [m.name for m in tarfile.open(fileobj=io.BytesIO(streams[1]))]
    assert second == ["d", "d/b"]


def test_a_limit_below_a_member_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        plan_parts(io.BytesIO(bytes(10240)), 1000)


def test_manifest_of_a_split_backup_lists_one_diff_id_per_part(driver, tmp_path: Path) -> None:
    _, s1 = make_chain(driver)
    layout = tmp_path / "l"
    result = backup(driver, s1, LayoutTarget(layout, create=True), tag="t", max_layer_bytes=LIMIT)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]).read_text())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    assert len(manifest["layers"]) == len(config["rootfs"]["diff_ids"]) == len(result.layers) > 2
