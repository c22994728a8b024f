"""The CSI wire format: csi.proto matches CSI v1.12 (the shared csi-wire-check tool),
csi.proto is what from_spec writes from the wire facts, and the committed generated
Python code is what regeneration gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from csi.proto import from_spec, generate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CHECK = SHARED / "tools" / "csi-wire-check"
FACTS = SHARED / "csi-spec" / "csi-v1.12-wire.json"
PROTO = REPO / "csi" / "proto" / "csi.proto"


@pytest.mark.skipif(not CHECK.exists(), reason=f"{CHECK} is absent (the shared directory sits next to the repo in CI)")
def test_wire_check_passes() -> None:
    out = subprocess.run([sys.executable, str(CHECK), str(PROTO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wire-compatible with CSI v1.12" in out.stdout


@pytest.mark.skipif(not FACTS.exists(), reason=f"{FACTS} is absent (the shared directory sits next to the repo in CI)")
def test_proto_is_written_from_the_wire_facts() -> None:
    assert from_spec.render(json.loads(FACTS.read_text())) == PROTO.read_text()


def test_generated_code_is_current() -> None:
    assert generate.stale_files() == [], "run: python -m csi.proto.generate"


def test_export_proto_is_generated_and_checked_too(tmp_path: Path) -> None:
    """strata's own export.proto goes through the same generation and staleness check."""
    fresh = {p.name for p in generate.generate(tmp_path)}
    assert {"csi_pb2.py", "export_pb2.py", "export_pb2.pyi", "export_pb2_grpc.py"} <= fresh
    from csi.proto import export_pb2

    assert export_pb2.DESCRIPTOR.name == "csi/proto/export.proto"
    service = export_pb2.DESCRIPTOR.services_by_name["DiffExport"]
    assert service.full_name == "strata.export.v1.DiffExport"
    streams = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streams == {"GetChain": (False, False), "Changes": (False, True), "DiffSize": (False, False),
                       "ExportDiff": (False, True), "ImportDiff": (True, False), "OpenExport": (False, False)}
