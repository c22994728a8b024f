"""Digests of frozen layer pairs (csi.backup.digests) on real drivers: hashed once when asked
at once, made in the background after a snapshot, and a cached digest that is wrong caught by
the receiver of the next export instead of being passed on as the truth."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from export_helpers import NODE, SNAP0, SNAP1, Export, driver_digest

from csi.backup.digests import Digests
from csi.backup.index import ExportIndex, ExportRecord
from csi.backup.media import LAYER_TAR
from csi.errors import DigestMismatch
from csi.proto import export_pb2_grpc
from csi.services.exportclient import ExportDiffReader


class CountingDiffs:
    """The driver, with its diff calls counted (every other call passes through)."""

    def __init__(self, driver: Any) -> None:
        self._driver, self.diffs = driver, 0
        self._lock = threading.Lock()

    def diff(self, *args: Any) -> Any:
        with self._lock:
            self.diffs += 1
        time.sleep(0.2)  # long enough for the second caller to arrive while the first hashes
        return self._driver.diff(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)


def test_a_pair_asked_for_at_once_is_hashed_once(export: Export, tmp_path: Path) -> None:
    drv = export.backend.driver
    counting = CountingDiffs(drv)
    digests = Digests(counting, ExportIndex(tmp_path / "fresh-index.json"))  # type: ignore[arg-type]
    layer, base = drv.layer(SNAP1), drv.layer(SNAP0)
    answers: list[tuple[str, int]] = []
    threads = [threading.Thread(target=lambda: answers.append(digests.diff_id(layer, base))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counting.diffs == 1
    assert answers == [driver_digest(drv, SNAP1, SNAP0)] * 3
    assert digests.diff_id(layer, base) == answers[0] and counting.diffs == 1  # from the cache now


def test_a_snapshot_queued_for_later_is_digested_in_the_background(export: Export, tmp_path: Path) -> None:
    drv = export.backend.driver
    index = ExportIndex(tmp_path / "background-index.json")
    digests = Digests(drv, index)  # type: ignore[arg-type]
    try:
        digests.later(SNAP1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            top = index.lookup(SNAP1, SNAP0, LAYER_TAR, drv.layer(SNAP1).created)
            bottom = index.lookup(SNAP0, None, LAYER_TAR, drv.layer(SNAP0).created)
            if top is not None and bottom is not None:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the background digests never appeared in the index")
        assert (top.diff_id, top.size) == driver_digest(drv, SNAP1, SNAP0)
        assert (bottom.diff_id, bottom.size) == driver_digest(drv, SNAP0, None)
        assert [t for t in threading.enumerate() if t.name == "digests"]
    finally:
        digests.close()
    assert not [t for t in threading.enumerate() if t.name == "digests" and t.is_alive()]


def test_a_wrong_cached_digest_is_caught_by_the_receiver(export: Export) -> None:
    """An export of a pair whose digest is cached is not hashed again on the sender; the
    receiver hashes what arrives, so a cache that lies fails the transfer (DATA_LOSS-class
    DigestMismatch), never a layer imported under a wrong name."""
    drv = export.backend.driver
    layer = drv.layer(SNAP1)
    _, size = driver_digest(drv, SNAP1, SNAP0)
    assert export.backend.index is not None
    export.backend.index.record(ExportRecord(SNAP1, SNAP0, layer.created, LAYER_TAR, "sha256:" + "1" * 64,
                                             "sha256:" + "1" * 64, size))
    reader = ExportDiffReader(export_pb2_grpc.DiffExportStub(export.channel), export.sid(SNAP1),
                              export.sid(SNAP0), source=f"node {NODE}")
    try:
        with pytest.raises(DigestMismatch, match="1111"):
            while reader.read(1 << 20):
                pass
    finally:
        reader.close()
