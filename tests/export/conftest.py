"""Fixtures of the export tests: real drivers with a chain of snapshots named as CSI names them,
the Diff export service on a real unix socket, a client.

* ``driver`` — vfs on ext4, overlay on ext4, btrfs (on the session's loop-file filesystem;
  skipped, saying why, when the kernel has no btrfs).
* ``export`` — :func:`export_helpers.make_snapshots` on that driver (SNAP0 <- SNAP1, OTHER),
  the service on ``<tmp>/export.sock`` through :func:`start_unix_export` with the export cache
  in ``<tmp>/backup-index.json``, and a stub.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from export_helpers import NODE, Export, make_snapshots

from csi.backup.index import ExportIndex
from csi.graphdriver.registry import new_driver
from csi.proto import export_pb2_grpc
from csi.services.export import ExportBackend, start_unix_export


@pytest.fixture(params=["vfs", "overlay", "btrfs"])
def driver(request: pytest.FixtureRequest, ext4_dir: Path) -> Iterator[object]:
    if request.param == "btrfs":
        root = request.getfixturevalue("btrfs_dir") / "root"
    else:
        root = ext4_dir / "root"
    drv = new_driver(root, request.param).driver
    yield drv
    drv.cleanup()


@pytest.fixture
def export(driver: object, tmp_path: Path) -> Iterator[Export]:
    make_snapshots(driver)
    backend = ExportBackend(driver, NODE, ExportIndex(tmp_path / "backup-index.json"))  # type: ignore[arg-type]
    server, endpoint = start_unix_export(backend, tmp_path / "export.sock")
    channel = grpc.insecure_channel(endpoint)
    try:
        yield Export(backend, endpoint, tmp_path / "export.sock", channel, export_pb2_grpc.DiffExportStub(channel))
    finally:
        channel.close()
        server.stop(0).wait()
