"""``strata backup push`` / ``restore`` as real processes, to and from an OCI image layout.

Direct mode: no plugin serves the root, the command opens the driver itself. Through the
plugin: the real Diff export service (``start_unix_export``, a real driver) answers on
``<root>/export.sock`` — the command must then never open the driver, and a second push of
the same snapshot moves no layer. Trees are compared byte for byte with the source snapshot
(``tests/backup/backup_helpers.tree``: modes, owners, times, xattrs, hard links).
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from export_helpers import NODE, SNAP0, SNAP1, make_snapshots  # isort: skip
from backup_helpers import snapshot_tree  # isort: skip

from csi.backup.index import ExportIndex
from csi.graphdriver.registry import new_driver
from csi.services.export import ExportBackend, start_unix_export
from csi.services.volume_ids import make_id, parse_id
from csi.state.store import StateStore

REPO = Path(__file__).resolve().parent.parent.parent


def strata(*args: str, stderr: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "STRATA_DRIVER")}
    env["HOME"] = "/nonexistent"  # no ~/.docker/config.json of the machine
    return subprocess.run([sys.executable, "-m", "csi.cli", "backup", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=stderr, timeout=300)


def answer_of(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def source(ext4_dir: Path) -> Iterator[tuple[Path, object]]:
    root = ext4_dir / "node-a"
    drv = new_driver(root, "vfs").driver
    make_snapshots(drv)
    yield root, drv


def test_direct_push_and_restore_into_a_volume(source: tuple[Path, object], ext4_dir: Path) -> None:
    root, drv = source
    layout = ext4_dir / "layout"
    proc = strata("push", make_id(SNAP1, NODE), "--to", f"oci-layout:{layout}:daily", "--root", str(root),
                  "--compression", "zstd")
    pushed = answer_of(proc)
    assert pushed["reference"].startswith(f"oci-layout:{layout}@sha256:") and pushed["tag"] == "daily"
    assert [l["layer"] for l in pushed["layers"]] == [SNAP0, SNAP1] and pushed["blobs_sent"] == 2
    progress = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert progress and progress[-1]["phase"] == "done" and progress[-1]["operation"] == "backup"
    assert progress[-1]["done"] >= pushed["layers"][1]["size"]
    # the export cache on the node now knows both diffs
    assert (root / "vfs" / "backup-index.json").exists()
    target_root = ext4_dir / "node-b"
    restored = answer_of(strata("restore", pushed["reference"], "--root", str(target_root), "--driver", "vfs",
                                "--volume-name", "pvc-restored", "--node-id", "node-b"))
    assert len(restored["imported"]) == 2 and restored["reused"] == []
    layer, node = parse_id(restored["volume_id"])
    assert node == "node-b"
    store = StateStore(target_root)
    try:
        record = store.volume_by_name("pvc-restored")
        assert record is not None and record.layer == layer
    finally:
        store.close()
    target = new_driver(target_root, "vfs").driver
    assert target.layer(layer).parent == restored["layer"] and not target.layer(layer).frozen
    assert snapshot_tree(target, layer) == snapshot_tree(drv, SNAP1)
    # the same name again is refused, and nothing more is made
    again = strata("restore", pushed["reference"], "--root", str(target_root), "--driver", "vfs",
                   "--volume-name", "pvc-restored", "--node-id", "node-b")
    assert again.returncode == 1 and "pvc-restored" in again.stderr
    assert sorted(l.id for l in new_driver(target_root, "vfs").driver.layers()) == sorted(l.id for l in target.layers())


def test_push_through_the_export_service(source: tuple[Path, object], ext4_dir: Path) -> None:
    root, drv = source
    server, _ = start_unix_export(ExportBackend(drv, NODE, ExportIndex(root / "vfs" / "backup-index.json")),
                                  root / "export.sock")
    layout = ext4_dir / "layout"
    try:
        # a root holding no driver state: the command cannot open a driver, only use the socket
        empty = ext4_dir / "empty-root"
        empty.mkdir()
        first = answer_of(strata("push", make_id(SNAP1, NODE), "--to", f"oci-layout:{layout}:v1",
                                 "--root", str(empty), "--export-socket", str(root / "export.sock")))
        assert not (empty / "vfs").exists()
        assert first["blobs_sent"] == 2 and first["blobs_skipped"] == 0
        # the second backup of the same snapshot moves no layer (digests from GetChain, HEAD on the target)
        calls: list[str] = []
        real = drv.diff

        def counting(layer: str, base: str | None = None):  # type: ignore[no-untyped-def]
            calls.append(layer)
            return real(layer, base)

        drv.diff = counting  # type: ignore[method-assign]
        try:
            second = answer_of(strata("push", make_id(SNAP1, NODE), "--to", f"oci-layout:{layout}:v2",
                                      "--root", str(root)))
        finally:
            del drv.diff
        assert second["blobs_sent"] == 0 and second["blobs_skipped"] == 2 and calls == []
        assert [l["digest"] for l in second["layers"]] == [l["digest"] for l in first["layers"]]
        # restored elsewhere (directly), the tree is the snapshot's
        target_root = ext4_dir / "node-b"
        restored = answer_of(strata("restore", first["reference"], "--root", str(target_root), "--driver", "vfs"))
        target = new_driver(target_root, "vfs").driver
        assert snapshot_tree(target, restored["layer"]) == snapshot_tree(drv, SNAP1)
    finally:
        server.stop(0).wait()


def test_restore_through_the_export_service(source: tuple[Path, object], ext4_dir: Path) -> None:
    root, drv = source
    layout = ext4_dir / "layout"
    pushed = answer_of(strata("push", SNAP1, "--to", f"oci-layout:{layout}:t", "--root", str(root),
                              "--compression", "zstd"))
    target_root = ext4_dir / "node-b"
    target = new_driver(target_root, "vfs").driver
    server, _ = start_unix_export(ExportBackend(target, "node-b"), target_root / "export.sock")
    try:
        first = answer_of(strata("restore", pushed["reference"], "--root", str(target_root)))
        assert len(first["imported"]) == 2 and first["layer"] == first["imported"][-1]
        assert target.layer(first["layer"]).frozen
        assert snapshot_tree(target, first["layer"]) == snapshot_tree(drv, SNAP1)
        second = answer_of(strata("restore", pushed["reference"], "--root", str(target_root)))
        assert second["imported"] == [] and second["reused"] == first["imported"]
    finally:
        server.stop(0).wait()


def test_progress_bar_on_a_terminal_and_clear_errors(source: tuple[Path, object], ext4_dir: Path) -> None:
    root, _ = source
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "STRATA_DRIVER")}
    proc = subprocess.Popen([sys.executable, "-m", "csi.cli", "backup", "push", make_id(SNAP0, NODE), "--to",
                             f"oci-layout:{ext4_dir / 'tty'}:t", "--root", str(root)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    try:
        while True:  # read while it writes (a full pty would block it)
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            shown += data
    finally:
        os.close(controller)
        proc.wait(timeout=300)
    assert proc.returncode == 0, shown.decode(errors="replace")
    assert b"\r" in shown and b'"phase"' not in shown  # a redrawn bar, not JSON lines
    # errors: a snapshot that does not exist, a malformed reference
    missing = strata("push", "snap-" + "9" * 32 + "@" + NODE, "--to", f"oci-layout:{ext4_dir / 'x'}:t",
                     "--root", str(root))
    assert missing.returncode == 1 and "snap-" + "9" * 32 in missing.stderr
    bad = strata("restore", "oci-layout:/no/digest", "--root", str(root))
    assert bad.returncode == 1 and "digest" in bad.stderr


@pytest.mark.parametrize("through", ["direct", "export service"])
def test_push_splits_layers_over_max_layer_bytes(source: tuple[Path, object], ext4_dir: Path, through: str) -> None:
    """``--max-layer-bytes``: the top layer (a big file plus small ones) goes as several layers,
    directly and through the export service (whose ExportDiff is read twice: plan, then send);
    the restored tree is the snapshot's."""
    root, drv = source
    layout = ext4_dir / "layout"
    server = None
    args = ["--root", str(root)]
    if through == "export service":
        server, _ = start_unix_export(ExportBackend(drv, NODE, ExportIndex(root / "vfs" / "backup-index.json")),
                                      root / "export.sock")
    try:
        whole = answer_of(strata("push", make_id(SNAP1, NODE), "--to", f"oci-layout:{ext4_dir / 'whole'}:t", *args))
        split = answer_of(strata("push", make_id(SNAP1, NODE), "--to", f"oci-layout:{layout}:t", *args,
                                 "--max-layer-bytes", "64K"))
        assert len(whole["layers"]) == 2 and len(split["layers"]) > 2
        assert [l["layer"] for l in split["layers"]][0] == SNAP0 and split["layers"][-1]["layer"] == SNAP1
        restored = answer_of(strata("restore", split["reference"], "--root", str(ext4_dir / "node-b"),
                                    "--driver", "vfs"))
        target = new_driver(ext4_dir / "node-b", "vfs").driver
        assert snapshot_tree(target, restored["layer"]) == snapshot_tree(drv, SNAP1)
    finally:
        if server is not None:
            server.stop(0).wait()
