"""Reference grammar, docker config parsing, manifest validation, progress rendering."""

from __future__ import annotations

import base64
import io
import json

import pytest

from csi.backup import JsonLines, TerminalBar, parse_docker_config, parse_reference
from csi.backup.media import CONFIG, MANIFEST, chain_id, digest_bytes, parse_config, parse_manifest
from csi.backup.progress import Meter
from csi.backup.registry import parse_challenge
from csi.errors import InvalidArgument

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("text,kind,host,repo,tag,digest", [
    (f"oci://registry.example.com/team/vol@{D}", "registry", "registry.example.com", "team/vol", None, D),
    ("oci://127.0.0.1:5000/a/b-c/d_e:daily", "registry", "127.0.0.1:5000", "a/b-c/d_e", "daily", None),
    (f"oci://localhost:5000/x:v1.2@{D}", "registry", "localhost:5000", "x", "v1.2", D),
    (f"oci-layout:/var/backups/vol-1@{D}", "layout", "", "/var/backups/vol-1", None, D),
    ("oci-layout:/mnt/nfs/strata:mon", "layout", "", "/mnt/nfs/strata", "mon", None),
])
def test_reference_grammar_accepts(text, kind, host, repo, tag, digest) -> None:
    ref = parse_reference(text)
    assert (ref.kind, ref.host, ref.repository, ref.tag, ref.digest) == (kind, host, repo, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize("text", [
    "", "docker://x/y:t", "oci://", "oci://host", "oci://host/", "oci://host/Repo:t", "oci://host/repo",
    "oci://host/repo@sha256:abc", f"oci://host/repo@sha512:{'a' * 128}", f"oci://host/repo@SHA256:{'A' * 64}",
    "oci://host:0/repo:t", "oci://host:99999/repo:t", "oci://-host/repo:t", "oci://ho st/repo:t",
    "oci://host/repo:-bad", "oci://host/repo:" + "t" * 129, "oci://host//repo:t", "oci://host/re..po:t",
    "oci-layout:relative/path:t", "oci-layout:/a/../b:t", "oci-layout:/a//b:t", "oci-layout:/:t",
    "oci-layout:/a/b", "oci-layout:/a b:t", "oci://host/repo:t\n", f"oci://user:pw@host/repo@{D}",
])
def test_reference_grammar_refuses(text) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


def test_restore_needs_a_digest() -> None:
    with pytest.raises(InvalidArgument, match="digest"):
        parse_reference("oci://host/repo:tag").require_digest()


def test_scheme_is_http_only_on_loopback() -> None:
    assert parse_reference("oci://127.0.0.1:5000/r:t").scheme == "http"
    assert parse_reference("oci://localhost/r:t").scheme == "http"
    assert parse_reference("oci://registry.example/r:t").scheme == "https"


def test_docker_config_forms_and_secrecy() -> None:
    auth = base64.b64encode(b"alice:pa:ss").decode()
    cfg = parse_docker_config(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": auth},
        "reg.example:5000": {"username": "bob", "password": "hunter2"},
        "ghcr.example": {"identitytoken": "refresh-me"},
    }}))
    assert cfg.for_host("docker.io").basic == ("alice", "pa:ss")
    assert cfg.for_host("REG.example:5000").basic == ("bob", "hunter2")
    assert cfg.for_host("ghcr.example").identity_token == "refresh-me"
    assert cfg.for_host("other").basic is None
    for secret in ("pa:ss", "hunter2", "refresh-me"):
        assert secret not in repr(cfg) and secret not in repr(cfg.auths) and secret not in str(cfg.for_host("docker.io"))


@pytest.mark.parametrize("doc", ["not json", "[]", '{"auths": []}', '{"auths": {"h": {"auth": "!!!"}}}',
                                 '{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}', '{"auths": {"h": 3}}'])
def test_docker_config_refuses_without_quoting(doc) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_docker_config(doc)
    assert "bm9jb2xvbg" not in str(err.value) and "!!!" not in str(err.value)


def test_challenge_parsing() -> None:
    scheme, params = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                                     'scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def _manifest(**over) -> bytes:
    obj = {"schemaVersion": 2, "mediaType": MANIFEST,
           "config": {"mediaType": CONFIG, "digest": D, "size": 10},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D, "size": 5}]}
    obj.update(over)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("data", [
    b"{", _manifest(schemaVersion=1), _manifest(mediaType="application/vnd.oci.image.index.v1+json"),
    _manifest(config={"mediaType": "application/vnd.unknown", "digest": D, "size": 1}), _manifest(layers=[]),
    _manifest(layers=[{"mediaType": "application/x-tar", "digest": D, "size": 5}]),
    _manifest(layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:zz", "size": 5}]),
    _manifest(layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D, "size": -1}]),
])
def test_manifest_validation(data) -> None:
    with pytest.raises(InvalidArgument):
        parse_manifest(data)


def test_config_validation_and_chain_id() -> None:
    _, layers = parse_manifest(_manifest())
    with pytest.raises(InvalidArgument, match="one entry per"):
        parse_config(json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode(), layers)
    ids, facts, _ = parse_config(json.dumps({"rootfs": {"type": "layers", "diff_ids": [D]},
                                             "config": {"Labels": {"dev.strata.capacity-bytes": "42"}}}).encode(), layers)
    assert ids == (D,) and facts.capacity_bytes == 42
    assert chain_id([D]) == D
    assert chain_id([D, D]) == digest_bytes(f"{D} {D}".encode())


def test_progress_renderers() -> None:
    clock = iter([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = io.StringIO()
    meter = Meter("backup", JsonLines(out), total=0, clock=lambda: next(clock))
    meter.add_total(1000)
    meter.begin("sha256:x", 1000)
    meter.advance(1000)
    meter.end_blob("sha256:x")
    final = meter.finish()
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert [l["phase"] for l in lines][0] == "start" and lines[-1]["phase"] == "done"
    assert final.done == 1000 and final.total == 1000 and final.rate > 0
    bar = io.StringIO()
    TerminalBar(bar)(final)
    assert "1000 B / 1000 B" in bar.getvalue() and bar.getvalue().endswith("\n")


def test_a_broken_progress_callback_does_not_break_the_operation() -> None:
    def boom(_):
        raise RuntimeError("renderer bug")

    meter = Meter("restore", boom)
    meter.advance(5)
    assert meter.finish().done == 5
