"""Regenerate the Python code for the protos in ``csi/proto/`` (reproducibly): ``csi.proto``
(the CSI spec) and ``export.proto`` (strata's Diff export service).

Usage::

    python -m csi.proto.generate            # rewrite <name>_pb2.py, <name>_pb2.pyi, <name>_pb2_grpc.py
    python -m csi.proto.generate --check    # exit 1 and name the files that are stale

The code is generated with ``grpc_tools.protoc`` (the version pinned in pyproject's test
extras) from the repository root with ``-I .``, so the modules import each other as
``csi.proto.csi_pb2`` and the descriptor's file name is ``csi/proto/csi.proto``.
The generated files are committed; ``tests/test_wire.py`` checks they are current.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
PROTO = PROTO_DIR / "csi.proto"
PROTOS = (PROTO, PROTO_DIR / "export.proto")
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generated_names(proto: Path) -> tuple[str, str, str]:
    stem = proto.stem
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto (one at a time), writing the generated files under ``out_dir``;
    return them."""
    import grpc_tools
    from grpc_tools import protoc

    std = Path(grpc_tools.__file__).parent / "_proto"
    out: list[Path] = []
    saved = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        for proto in PROTOS:
            rel = proto.relative_to(REPO_ROOT)
            args = ["protoc", f"-I{std}", f"-I{REPO_ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                    f"--grpc_python_out={out_dir}", str(rel)]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            out += [out_dir / rel.parent / name for name in generated_names(proto)]
    finally:
        os.chdir(saved)
    return out


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh
                if not (PROTO_DIR / p.name).exists() or (PROTO_DIR / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale) + " (run python -m csi.proto.generate)")
            return 1
        print("generated code is current")
        return 0
    if args:
        print("usage: python -m csi.proto.generate [--check]", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (PROTO_DIR / path.name).write_bytes(path.read_bytes())
            print(f"wrote {PROTO_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
