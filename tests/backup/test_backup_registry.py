"""Backups pushed to and restored from a real distribution registry (Debian's docker-registry),
anonymous, with htpasswd basic auth, and with token auth (stand-in token server, see conftest),
checked with skopeo and umoci."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import requests

from backup_helpers import make_chain, make_driver, need, run, snapshot_tree, tree
from csi.backup import (ExportIndex, JsonLines, VolumeFacts, backup, parse_docker_config,
                        parse_reference, restore)
from csi.backup.media import LAYER_TAR_GZIP
from csi.backup.registry import RegistryTarget
from csi.errors import DigestMismatch, NotFound, Unauthenticated
from registry_support import PASSWORD, USER

SMALL_CHUNK = 64 << 10  # several PATCH requests per layer


def _target(reg, repo: str, **kw) -> RegistryTarget:
    creds = parse_docker_config(reg.docker_config()).for_host(reg.host) if reg.auth != "none" else None
    extra = {"credentials": creds} if creds else {}
    return RegistryTarget(reg.host, repo, scheme="http", chunk_size=SMALL_CHUNK, **{**extra, **kw})


def _facts(drv) -> VolumeFacts:
    return VolumeFacts(capacity_bytes=2 << 30, driver=drv.name, source_names={"pvc": "ns/data"})


def _skopeo_creds(reg) -> list[str]:
    return ["--creds", f"{USER}:{PASSWORD}"] if reg.auth != "none" else []


def _check_with_tools(reg, repo: str, tag: str, drv, snap: str, tmp: Path) -> None:
    need("skopeo")
    need("umoci")
    src = f"docker://{reg.host}/{repo}:{tag}"
    info = json.loads(run("skopeo", "inspect", "--tls-verify=false", *_skopeo_creds(reg), src).stdout)
    assert info["Labels"]["dev.strata.source.pvc"] == "ns/data"
    layout = tmp / f"copy-{tag}"
    run("skopeo", "copy", "--src-tls-verify=false", *[a.replace("--creds", "--src-creds") for a in _skopeo_creds(reg)],
        src, f"oci:{layout}:{tag}")
    run("umoci", "raw", "unpack", "--image", f"{layout}:{tag}", str(tmp / f"rootfs-{tag}"))
    assert tree(tmp / f"rootfs-{tag}") == snapshot_tree(drv, snap)


def test_push_check_with_skopeo_umoci_and_restore_elsewhere(driver, registry, tmp_path: Path) -> None:
    _, s1 = make_chain(driver)
    target = _target(registry, "team/vol")
    out = io.StringIO()
    result = backup(driver, s1, target, tag="daily", facts=_facts(driver), progress=JsonLines(out))
    assert result.reference.startswith(f"oci://{registry.host}/team/vol@sha256:")
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert lines[0]["phase"] == "start" and lines[-1]["phase"] == "done"
    assert lines[-1]["done"] == result.bytes_sent > sum(l.blob.size for l in result.layers)
    _check_with_tools(registry, "team/vol", "daily", driver, s1, tmp_path)
    ref = parse_reference(result.reference)
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        got = restore(other, _target(registry, ref.repository), ref.require_digest())
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
        assert got.bytes_pulled == sum(l.blob.size for l in result.layers)
        again = restore(other, _target(registry, ref.repository), ref.require_digest())
        assert again.imported == () and again.bytes_pulled == 0
    finally:
        other.cleanup()


def test_incremental_and_cross_repository_mount(driver, registry, tmp_path: Path) -> None:
    s0, s1 = make_chain(driver)
    index = ExportIndex(tmp_path / "index.json")
    first = backup(driver, s0, _target(registry, "a"), tag="day1", index=index)
    assert (first.blobs_sent, first.blobs_skipped) == (1, 0)
    second = backup(driver, s1, _target(registry, "a"), tag="day2", index=index)
    assert (second.blobs_sent, second.blobs_skipped) == (1, 1)
    # what moved is the new layer, config and manifest: not the base layer again
    assert second.bytes_sent < second.layers[1].blob.size + 4096
    # another repository of the same registry: both layers are mounted, none is sent
    third = backup(driver, s1, _target(registry, "b"), tag="copy", index=index)
    assert (third.blobs_sent, third.blobs_skipped) == (0, 2)
    b = _target(registry, "b")
    assert all(b.has_blob(l.blob.digest) for l in third.layers)
    # the restore on the node that made the backup reuses its own layers (export cache)
    got = restore(driver, b, third.manifest_digest, index=index)
    assert got.imported == () and got.layer_id == s1 and got.bytes_pulled == 0


def test_delete_tag_and_manifest(driver, registry) -> None:
    _, s1 = make_chain(driver)
    target = _target(registry, "del")
    result = backup(driver, s1, target, tag="gone")
    target.delete("gone")  # distribution 2.8 deletes by digest only: the fallback resolves the tag
    with pytest.raises(NotFound):
        target.get_manifest("gone")
    with pytest.raises(NotFound):
        target.get_manifest(result.manifest_digest)


def test_corrupt_blob_in_registry_is_refused(driver, registry, tmp_path: Path) -> None:
    _, s1 = make_chain(driver)
    result = backup(driver, s1, _target(registry, "corrupt"), tag="x")
    hexd = result.layers[1].blob.digest.split(":")[1]
    data_file = registry.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    data = bytearray(data_file.read_bytes())
    data[700] ^= 0x40
    data_file.write_bytes(bytes(data))
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        with pytest.raises(DigestMismatch, match="hashes to"):
            restore(other, _target(registry, "corrupt"), result.manifest_digest)
        assert {l.id for l in other.layers()} == {l.id for l in other.layers() if l.id.startswith("oci-")}
        assert len(other.layers()) == 1  # only the verified bottom layer
    finally:
        other.cleanup()


def test_basic_auth_with_docker_config(driver, registry_basic, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    _, s1 = make_chain(driver)
    with pytest.raises(Unauthenticated, match="none are configured"):
        backup(driver, s1, RegistryTarget(registry_basic.host, "secure", scheme="http"), tag="t")
    wrong = parse_docker_config(json.dumps({"auths": {registry_basic.host: {"username": USER, "password": "nope"}}}))
    with pytest.raises(Unauthenticated):
        backup(driver, s1, RegistryTarget(registry_basic.host, "secure", scheme="http",
                                          credentials=wrong.for_host(registry_basic.host)), tag="t")
    result = backup(driver, s1, _target(registry_basic, "secure"), tag="t", facts=_facts(driver))
    _check_with_tools(registry_basic, "secure", "t", driver, s1, tmp_path)
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        got = restore(other, _target(registry_basic, "secure"), result.manifest_digest)
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
    finally:
        other.cleanup()
    assert PASSWORD not in caplog.text
    creds = parse_docker_config(registry_basic.docker_config()).for_host(registry_basic.host)
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds)


def test_token_auth_challenge_flow(driver, registry_token, token_server, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assert requests.get(f"http://{registry_token.host}/v2/", timeout=5).status_code == 401
    _, s1 = make_chain(driver)
    with pytest.raises(Unauthenticated):
        backup(driver, s1, RegistryTarget(registry_token.host, "tok", scheme="http"), tag="t")
    result = backup(driver, s1, _target(registry_token, "tok"), tag="t", facts=_facts(driver))
    assert any("repository:tok:" in s and "push" in s for s in token_server.requests)
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        got = restore(other, _target(registry_token, "tok"), result.manifest_digest)
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
    finally:
        other.cleanup()
    _check_with_tools(registry_token, "tok", "t", driver, s1, tmp_path)
    assert PASSWORD not in caplog.text


def test_skopeo_copy_from_layout_to_registry_restores(driver, registry, tmp_path: Path) -> None:
    """An artifact strata wrote as a layout, pushed by skopeo (not by strata), restores."""
    need("skopeo")
    from csi.backup.layout import LayoutTarget

    _, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    result = backup(driver, s1, LayoutTarget(layout, create=True), tag="v")
    run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v", f"docker://{registry.host}/pushed:v")
    target = _target(registry, "pushed")
    data, digest = target.get_manifest("v")
    other = make_driver(tmp_path / "node-b", driver.name)
    try:
        got = restore(other, target, digest)
        assert snapshot_tree(other, got.layer_id) == snapshot_tree(driver, s1)
        # skopeo gzipped the layers on the way: other blobs, the same diff_ids, the same tree
        assert list(got.artifact.diff_ids) == [l.diff_id for l in result.layers]
        assert {l.media_type for l in got.artifact.layers} == {LAYER_TAR_GZIP}
    finally:
        other.cleanup()
