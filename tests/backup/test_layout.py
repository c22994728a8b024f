"""Backups into an OCI image layout directory, checked with umoci and skopeo (tools nobody
here wrote), restored through the contract, and the crash/verification properties of restore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backup_helpers import make_chain, make_driver, need, run, snapshot_tree, tree
from csi.backup import (ExportIndex, VolumeFacts, backup, imported_layer_id, is_temporary, open_target,
                        parse_reference, restore, sweep_temporaries)
from csi.backup.layout import LayoutTarget
from csi.backup.media import LAYER_TAR, LAYER_TAR_ZSTD, chain_id
from csi.errors import DigestMismatch


def _backup_to_layout(drv, snap: str, layout: Path, tag: str = "v1", **kw):
    target = open_target(parse_reference(f"oci-layout:{layout}:{tag}"), create=True)
    facts = VolumeFacts(capacity_bytes=1 << 30, driver=drv.name, filesystem="ext4",
                        source_names={"snapshot": "default/snap-1"})
    return backup(drv, snap, target, tag=tag, facts=facts, **kw)


def test_umoci_unpacks_the_snapshot_byte_for_byte(driver, tmp_path: Path) -> None:
    need("umoci")
    need("skopeo")
    s0, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    result = _backup_to_layout(driver, s1, layout)
    assert [l.layer_id for l in result.layers] == [s0, s1]
    assert all(l.blob.media_type == LAYER_TAR and l.blob.digest == l.diff_id for l in result.layers)
    run("umoci", "raw", "unpack", "--image", f"{layout}:v1", str(tmp_path / "rootfs"))
    assert tree(tmp_path / "rootfs") == snapshot_tree(driver, s1)
    # the layout is valid for skopeo too, and shows strata's facts
    info = json.loads(run("skopeo", "inspect", f"oci:{layout}:v1").stdout)
    assert info["Labels"]["dev.strata.capacity-bytes"] == str(1 << 30)
    assert info["Labels"]["dev.strata.source.snapshot"] == "default/snap-1"
    assert len(info["Layers"]) == 2


def test_zstd_layers_decompress_to_the_tars_umoci_accepts(driver, tmp_path: Path) -> None:
    """umoci 0.4.7 (Debian 12) predates zstd layers, so the zstd artifact is checked with the
    zstd tool: each blob decompresses to exactly the uncompressed artifact's layer (which the
    test above unpacks with umoci), whose digest is the config's diff_id."""
    need("zstd")
    need("skopeo")
    _, s1 = make_chain(driver)
    plain = _backup_to_layout(driver, s1, tmp_path / "plain", created="2026-01-01T00:00:00Z")
    packed = _backup_to_layout(driver, s1, tmp_path / "packed", compression="zstd", created="2026-01-01T00:00:00Z")
    for p, z in zip(plain.layers, packed.layers):
        assert z.blob.media_type == LAYER_TAR_ZSTD and z.diff_id == p.diff_id == p.blob.digest
        blob = tmp_path / "packed" / "blobs" / "sha256" / z.blob.digest.split(":")[1]
        out = run("sh", "-c", f"zstd -d -c {blob} | sha256sum").stdout.split()[0]
        assert f"sha256:{out}" == p.diff_id
    raw = json.loads(run("skopeo", "inspect", "--raw", f"oci:{tmp_path / 'packed'}:v1").stdout)
    assert [l["mediaType"] for l in raw["layers"]] == [LAYER_TAR_ZSTD] * 2
    other = make_driver(tmp_path / "other-node", driver.name)
    try:
        got = restore(other, LayoutTarget(tmp_path / "packed"), packed.manifest_digest)
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
    finally:
        other.cleanup()


def test_restore_from_layout_reproduces_the_chain_and_second_restore_pulls_nothing(driver, tmp_path: Path) -> None:
    s0, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    result = _backup_to_layout(driver, s1, layout)
    other = make_driver(tmp_path / "other-node", driver.name)  # another node: a fresh driver root
    try:
        target = open_target(parse_reference(result.reference))
        got = restore(other, target, parse_reference(result.reference).require_digest())
        assert len(got.imported) == 2 and got.reused == ()
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
        assert snapshot_tree(other, got.imported[0]) == snapshot_tree(driver, s0)
        assert got.layer_id == imported_layer_id(chain_id([l.diff_id for l in result.layers]))
        assert got.artifact.facts.capacity_bytes == 1 << 30
        assert not any(is_temporary(l.id) for l in other.layers())
        again = restore(other, target, result.manifest_digest)
        assert again.imported == () and again.bytes_pulled == 0 and again.layer_id == got.layer_id
        # a volume on top, as CreateVolume from the backup does
        other.create("vol", got.layer_id)
        assert snapshot_tree(other, "vol") == snapshot_tree(driver, s1)
    finally:
        other.cleanup()


def test_incremental_backup_sends_only_the_new_layer(driver, tmp_path: Path) -> None:
    s0, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    index = ExportIndex(tmp_path / "index.json")
    first = _backup_to_layout(driver, s0, layout, tag="day1", index=index)
    assert first.blobs_sent == 1 and first.blobs_skipped == 0
    second = _backup_to_layout(driver, s1, layout, tag="day2", index=index)
    assert second.blobs_sent == 1 and second.blobs_skipped == 1
    assert second.layers[0].blob == first.layers[0].blob
    third = _backup_to_layout(driver, s1, layout, tag="day3", index=index)
    assert third.blobs_sent == 0 and third.manifest_digest != second.manifest_digest or third.blobs_sent == 0


def test_diffs_are_deterministic_so_a_backup_without_cache_dedups_in_the_layout(driver, tmp_path: Path) -> None:
    _, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    a = _backup_to_layout(driver, s1, layout, tag="a", created="2026-01-01T00:00:00Z")
    b = _backup_to_layout(driver, s1, layout, tag="b", created="2026-01-01T00:00:00Z")
    assert a.manifest_digest == b.manifest_digest
    assert len(os.listdir(layout / "blobs" / "sha256")) == 4  # two layers, config, manifest


def test_corrupt_blob_is_refused_and_leaves_nothing(driver, tmp_path: Path) -> None:
    _, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    result = _backup_to_layout(driver, s1, layout)
    blob = layout / "blobs" / "sha256" / result.layers[1].blob.digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[700] ^= 0x01  # inside the first file's data: the tar still parses
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    other = make_driver(tmp_path / "other-node", driver.name)
    try:
        before = {l.id for l in other.layers()}
        with pytest.raises(DigestMismatch, match="hashes to"):
            restore(other, LayoutTarget(layout), result.manifest_digest)
        after = {l.id for l in other.layers()}
        # the bottom layer was fine and stays (a verified, reusable layer); nothing else exists
        assert after - before == {imported_layer_id(result.layers[0].diff_id)}
        assert not any(is_temporary(i) for i in after)
    finally:
        other.cleanup()


def test_sweep_removes_a_temporary_layer_left_by_a_kill(driver, tmp_path: Path) -> None:
    from csi.backup.index import temp_layer_id

    tmp = temp_layer_id()
    driver.create(tmp)
    assert sweep_temporaries(driver) == [tmp]
    assert not driver.exists(tmp)


def test_layout_delete_untags_and_collects_garbage(driver, tmp_path: Path) -> None:
    s0, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    a = _backup_to_layout(driver, s0, layout, tag="a")
    b = _backup_to_layout(driver, s1, layout, tag="b")
    target = LayoutTarget(layout)
    target.delete("b")
    assert not target.has_blob(b.layers[1].blob.digest)
    assert target.has_blob(a.layers[0].blob.digest)  # still used by tag a
    target.get_manifest("a")


def test_a_deleted_ancestor_is_folded_into_the_next_layer(driver, tmp_path: Path) -> None:
    s0, s1 = make_chain(driver)
    driver.remove(s0)  # hidden: s1 still needs it
    result = _backup_to_layout(driver, s1, tmp_path / "layout")
    assert [l.layer_id for l in result.layers] == [s1]
    other = make_driver(tmp_path / "other-node", driver.name)
    try:
        got = restore(other, LayoutTarget(tmp_path / "layout"), result.manifest_digest)
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
    finally:
        other.cleanup()
