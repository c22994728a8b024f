"""The Diff export service as ``strata serve`` offers it: on ``export.sock`` beside the CSI
socket (owner-only), answering for snapshots the CSI Controller made, and used by
``strata backup push`` while the plugin runs (the driver is never opened a second time)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "csi"))
from csi_harness import Harness  # noqa: E402

from csi.proto import csi_pb2 as pb  # noqa: E402
from csi.proto import export_pb2, export_pb2_grpc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_serve_offers_export_beside_the_csi_socket(scratch_root: Path) -> None:
    base = scratch_root / f"serve-export-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    h = Harness(base, "vfs").start()
    try:
        sock = base / "export.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        vol = h.create_volume("pvc-a", size=8 << 20).volume_id
        staging, target = h.staging_path("pvc-a"), h.target_path("pod-a")
        h.stage(vol, staging)
        h.publish(vol, staging, target)
        (target / "hello.txt").write_text("from the volume\n")
        snap = h.snapshot("snap-a", vol).snapshot_id
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            chain = export_pb2_grpc.DiffExportStub(channel).GetChain(
                export_pb2.GetChainRequest(snapshot=export_pb2.SnapshotRef(snapshot_id=snap)), timeout=60)
        assert len(chain.layers) >= 1 and all(l.digest.startswith("sha256:") for l in chain.layers)
        layout = base / "layout"
        run = subprocess.run([sys.executable, "-m", "csi.cli", "backup", "push", snap, "--to",
                              f"oci-layout:{layout}:v1", "--root", str(h.root), "--export-socket", str(sock)],
                             cwd=REPO, text=True, capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr
        answer = json.loads(run.stdout)
        assert answer["blobs_sent"] == len(chain.layers) and "@sha256:" in answer["reference"]
        index = json.loads((layout / "index.json").read_text())
        assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["v1"]
        h.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol, target_path=str(target)))
        h.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol, staging_target_path=str(staging)))
    finally:
        h.teardown()
    assert not (base / "export.sock").exists(), "the export socket outlived the plugin"
