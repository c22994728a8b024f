"""kill -9 of the process serving ImportDiff, inside apply_diff and after the freeze, then a
restart: no half-imported layer is visible, the start-up sweep (``sweep_temporaries``, which
``strata serve`` runs before serving) removes the temporary layer, and the retried import
completes — byte for byte the source snapshot. Real processes, real drivers (vfs, overlay).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from export_helpers import SNAP1, make_snapshots  # isort: skip
from backup_helpers import snapshot_tree  # isort: skip

from csi.backup import imported_layer_id, is_temporary, sweep_temporaries
from csi.graphdriver.registry import driver_class, home_of, new_driver
from csi.proto import export_pb2 as pb, export_pb2_grpc
from csi.services.export import ExportBackend

WORKER = Path(__file__).with_name("import_worker.py")
REPO = Path(__file__).resolve().parent.parent.parent
PIECE = 64 << 10


def start_worker(name: str, root: Path, sock: Path, point: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(WORKER), name, str(root), str(sock), point], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + (proc.stderr.read() if proc.poll() is not None else "")
    return proc


def requests(header: pb.ImportHeader, blob: bytes, hold: threading.Event | None) -> Iterator[pb.ImportDiffRequest]:
    yield pb.ImportDiffRequest(header=header)
    for i in range(0, len(blob), PIECE):
        if hold is not None and i >= 4 * PIECE:
            hold.wait(60)  # the server now sits inside apply_diff, waiting for more
            return
        yield pb.ImportDiffRequest(data=blob[i:i + PIECE])


@pytest.mark.parametrize("point", ["apply", "freeze"])
@pytest.mark.parametrize("name", ["vfs", "overlay"])
def test_kill_during_import_then_restart(name: str, point: str, ext4_dir: Path) -> None:
    source = new_driver(ext4_dir / "node-a", name).driver
    make_snapshots(source)
    messages = list(ExportBackend(source, "node-a").export(source.layer(SNAP1), None, pb.NONE, 0))
    blob, diff_id = b"".join(m.data for m in messages), messages[-1].summary.diff_id
    assert len(blob) > 8 * PIECE
    final = imported_layer_id(diff_id)
    root, sock = ext4_dir / "node-b", ext4_dir / "b.sock"
    worker = start_worker(name, root, sock, "freeze" if point == "freeze" else "none")
    hold = threading.Event() if point == "apply" else None
    channel = grpc.insecure_channel(f"unix://{sock}")
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(export_pb2_grpc.DiffExportStub(channel).ImportDiff(
                requests(pb.ImportHeader(diff_id=diff_id), blob, hold)))
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    caller = threading.Thread(target=call)
    caller.start()
    try:
        if point == "apply":  # wait for the temporary layer, then kill while it is half applied
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    is_temporary(l.id) for l in driver_class(name).read_layers(home_of(root, name))):
                time.sleep(0.05)
            time.sleep(0.3)
        else:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "AT freeze"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if hold is not None:
            hold.set()
        caller.join(timeout=60)
        channel.close()
    assert outcome == [grpc.StatusCode.UNAVAILABLE]
    # restart: what is visible, and the sweep
    records = driver_class(name).read_layers(home_of(root, name))
    assert any(is_temporary(l.id) for l in records)  # the kill did leave a half-done import
    restarted = new_driver(root, name).driver
    swept = sweep_temporaries(restarted)
    assert swept and not [l.id for l in restarted.layers() if is_temporary(l.id)]
    if point == "apply":
        assert not restarted.exists(final)  # never visible unverified
    else:
        assert restarted.layer(final).frozen  # verified and frozen before the kill: complete
    # the retried import completes (or finds the layer complete)
    retry = start_worker(name, root, sock, "none")
    try:
        with grpc.insecure_channel(f"unix://{sock}") as again:
            answer = export_pb2_grpc.DiffExportStub(again).ImportDiff(
                requests(pb.ImportHeader(diff_id=diff_id), blob, None))
        assert answer.layer_id == final and answer.existed == (point == "freeze")
    finally:
        retry.kill()
        retry.wait(timeout=30)
    check = new_driver(root, name).driver
    assert snapshot_tree(check, final) == snapshot_tree(source, SNAP1)
    assert not [l.id for l in check.layers() if is_temporary(l.id)]
