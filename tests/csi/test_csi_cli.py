"""The commands as users run them: ``strata serve --version``, bad flags, ``strata demo``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from csi import __version__
from csi.host import mount as mnt


def strata(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_version_and_bad_flags(ext4_dir: Path) -> None:
    out = strata("serve", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"strata {__version__}"
    bad = strata("serve", "--driver", "zfs", "--root", str(ext4_dir))
    assert bad.returncode == 2 and "invalid choice: 'zfs'" in bad.stderr
    bad_node = strata("serve", "--node-id", "../evil", "--root", str(ext4_dir / "r"), "--driver", "vfs")
    assert bad_node.returncode == 1 and "node id" in bad_node.stderr
    not_socket = ext4_dir / "file"
    not_socket.write_text("precious")
    refused = strata("serve", "--endpoint", f"unix://{not_socket}", "--root", str(ext4_dir / "r2"), "--driver", "vfs")
    assert refused.returncode == 1 and not_socket.read_text() == "precious"


def test_demo_runs_end_to_end(ext4_dir: Path) -> None:
    root = ext4_dir / "demo"
    out = strata("demo", "--root", str(root), "--driver", "vfs")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout and "FAILED" not in out.stdout
    assert mnt.mounts_under(root) == []
