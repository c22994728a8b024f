"""Helpers of the export tests: snapshots named as CSI names them, made through the contract."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backup"))

from backup_helpers import change_top, fill_base  # noqa: E402

from csi.proto import export_pb2_grpc  # noqa: E402
from csi.services.export import ExportBackend  # noqa: E402
from csi.services.volume_ids import make_id  # noqa: E402

NODE = "node-a"
SNAP0 = "snap-" + "0" * 31 + "a"
SNAP1 = "snap-" + "0" * 31 + "b"
OTHER = "snap-" + "0" * 31 + "c"  # a snapshot of another volume (not an ancestor of SNAP1)
BIG = 3 * (1 << 20) + 12345


def driver_digest(drv: object, layer: str, base: str | None) -> tuple[str, int]:
    """``(sha256:…, size)`` of the driver's diff of the pair, read here."""
    raw = drv.diff(layer, base)  # type: ignore[attr-defined]
    h, n = hashlib.sha256(), 0
    try:
        while data := raw.read(1 << 20):
            h.update(data)
            n += len(data)
    finally:
        raw.close()
    return "sha256:" + h.hexdigest(), n


def make_snapshots(drv: object) -> None:
    """SNAP0 <- SNAP1 (every kind of metadata, and a BIG file on top), and OTHER from a separate volume."""
    drv.create("vol-a")  # type: ignore[attr-defined]
    fill_base(drv.get("vol-a"))  # type: ignore[attr-defined]
    drv.put("vol-a")  # type: ignore[attr-defined]
    drv.freeze("vol-a", SNAP0)  # type: ignore[attr-defined]
    drv.create("vol-b", SNAP0)  # type: ignore[attr-defined]
    root = drv.get("vol-b")  # type: ignore[attr-defined]
    change_top(root)
    (root / "big").write_bytes(os.urandom(BIG))
    drv.put("vol-b")  # type: ignore[attr-defined]
    drv.freeze("vol-b", SNAP1)  # type: ignore[attr-defined]
    drv.create("vol-c")  # type: ignore[attr-defined]
    (drv.get("vol-c") / "c").write_bytes(b"other")  # type: ignore[attr-defined]
    drv.put("vol-c")  # type: ignore[attr-defined]
    drv.freeze("vol-c", OTHER)  # type: ignore[attr-defined]


@dataclass
class Export:
    backend: ExportBackend
    endpoint: str
    socket: Path
    channel: grpc.Channel
    stub: export_pb2_grpc.DiffExportStub

    @staticmethod
    def sid(layer: str) -> str:
        return make_id(layer, NODE)
