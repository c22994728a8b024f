"""kill -9 of ``strata backup push`` (direct mode: the command opens the driver) in the middle of
an upload, to a real registry and to an OCI layout: the target holds no manifest for the tag
(a manifest goes last) and no half-written blob under a digest; the killed command's diff
streams left mount references on the snapshot's layers, which the next direct command releases
before it works; the retried push completes and umoci unpacks it to the snapshot's tree."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from backup_helpers import make_driver, need, run, snapshot_tree, tree
from csi.host import mount as mnt

REPO = Path(__file__).resolve().parents[2]
BIG = 96 << 20  # several progress reports (every 8 MiB) before the layer is sent


def _push(root: Path, driver: str, snap: str, to: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "STRATA_DRIVER")}
    env["HOME"] = "/nonexistent"
    return subprocess.Popen([sys.executable, "-m", "csi.cli", "backup", "push", snap, "--to", to, "--root", str(root),
                             "--driver", driver], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _kill_mid_upload(proc: subprocess.Popen[str]) -> int:
    """SIGKILL once the progress lines show bytes of the big layer moving; returns them."""
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            if not line.startswith("{"):
                continue
            p = json.loads(line)
            if p["phase"] == "blob" and 0 < p.get("blob_done", 0) < BIG:
                os.kill(proc.pid, signal.SIGKILL)
                return p["blob_done"]
        raise AssertionError(f"push ended before it could be killed: {proc.wait()} {proc.stdout.read()}")  # type: ignore[union-attr]
    finally:
        proc.wait(60)


def _snapshot(root: Path, driver: str) -> str:
    drv = make_driver(root, driver)
    drv.create("cv")
    data = drv.get("cv")
    (data / "small").write_bytes(b"small file")
    with open(data / "big", "wb") as f:
        for _ in range(BIG >> 20):
            f.write(os.urandom(1 << 20))
    os.mkdir(data / "dir")
    os.link(data / "small", data / "dir" / "hard")
    drv.put("cv")
    drv.freeze("cv", "cs")
    drv.remove("cv")
    return "cs"


def _references(root: Path, driver: str, layer: str) -> int:
    return make_driver(root, driver).references(layer)  # type: ignore[attr-defined]


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
@pytest.mark.parametrize("kind", ["registry", "layout"])
def test_kill_during_push_leaves_no_manifest_no_leak_and_retry_completes(driver: str, kind: str, registry,
                                                                          ext4_dir: Path, tmp_path: Path) -> None:
    need("umoci")
    root = ext4_dir / f"node-{driver}-{kind}"
    snap = _snapshot(root, driver)
    want = snapshot_tree(make_driver(root, driver), snap)
    layout = tmp_path / "layout"
    to = f"oci://{registry.host}/crash/vol:t" if kind == "registry" else f"oci-layout:{layout}:t"
    moved = _kill_mid_upload(_push(root, driver, snap, to))
    assert moved > 0
    # the target: no manifest under the tag, no blob stored under a digest it does not have
    if kind == "registry":
        answer = requests.get(f"http://{registry.host}/v2/crash/vol/manifests/t", timeout=10,
                              headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert answer.status_code == 404
    else:
        index = layout / "index.json"
        assert not index.exists() or json.loads(index.read_text()).get("manifests", []) == []
        for blob in (layout / "blobs" / "sha256").glob("*") if (layout / "blobs").exists() else ():
            if blob.is_file():
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    # the killed command's diff stream read through a view, which is never recorded
    assert _references(root, driver, snap) == 0
    retry = _push(root, driver, snap, to)
    out, err = retry.communicate(timeout=300)
    assert retry.returncode == 0, err[-3000:]
    pushed = json.loads(out)
    assert _references(root, driver, snap) == 0
    assert [m for m in mnt.mounts_under(root)] == []
    # the retried artifact is whole: umoci unpacks the snapshot's tree
    image = tmp_path / "pulled"
    if kind == "registry":
        run("skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/crash/vol:t", f"oci:{image}:t")
    else:
        image = layout
        leftovers = [p for p in layout.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))]
        assert leftovers == []
    run("umoci", "raw", "unpack", "--image", f"{image}:t", str(tmp_path / "rootfs"))
    assert tree(tmp_path / "rootfs") == want
    assert pushed["reference"].split("@")[1].startswith("sha256:")
