"""kill -9 of a restore in the middle of an import, then a restart: nothing half-imported is
visible, the start-up sweep removes the temporary layer, the retried restore completes.
Also: a backup on btrfs (the third driver of this kernel), restored on vfs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backup_helpers import make_chain, make_driver, snapshot_tree
from csi.backup import backup, imported_layer_id, is_temporary, restore, sweep_temporaries
from csi.backup.layout import LayoutTarget
from csi.backup.media import chain_id

WORKER = Path(__file__).with_name("crash_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _run_until(args: list[str], point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(WORKER), *args, point], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == f"AT {point}", f"worker: {line!r} {proc.stderr.read()[-2000:]}"  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)


@pytest.mark.parametrize("point", ["apply", "freeze"])
def test_kill_during_import_leaves_nothing_visible_and_retry_completes(driver, tmp_path: Path, point: str) -> None:
    _, s1 = make_chain(driver)
    layout = tmp_path / "layout"
    result = backup(driver, s1, LayoutTarget(layout, create=True), tag="v")
    top = imported_layer_id(chain_id([l.diff_id for l in result.layers]))
    root = tmp_path / "node-b"
    make_driver(root, driver.name).cleanup()
    _run_until([driver.name, str(root), str(layout), result.manifest_digest], point)
    other = make_driver(root, driver.name)  # the restart: the driver reconciles its records
    try:
        if point == "apply":
            assert not other.exists(top)  # the killed layer never became visible
        leftovers = sweep_temporaries(other)
        assert len(leftovers) == 1 and is_temporary(leftovers[0])
        assert not any(is_temporary(l.id) for l in other.layers())
        got = restore(other, LayoutTarget(layout), result.manifest_digest)
        assert got.layer_id == top
        assert snapshot_tree(other, top) == snapshot_tree(driver, s1)
        if point == "freeze":
            assert got.imported == (top,) and len(got.reused) == 1  # layer 0, frozen and verified, survived
    finally:
        other.cleanup()


def test_btrfs_backup_restores_on_vfs(btrfs_dir: Path, ext4_dir: Path, tmp_path: Path) -> None:
    src = make_driver(btrfs_dir / "root", "btrfs")
    dst = make_driver(ext4_dir / "root", "vfs")
    try:
        _, s1 = make_chain(src)
        result = backup(src, s1, LayoutTarget(tmp_path / "layout", create=True), tag="b")
        got = restore(dst, LayoutTarget(tmp_path / "layout"), result.manifest_digest)
        assert snapshot_tree(dst, got.layer_id) == snapshot_tree(src, s1)
    finally:
        src.cleanup()
        dst.cleanup()
