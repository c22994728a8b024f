"""``strata gc --imported`` as a real process: a node's cache of imported layers (``oci-…``,
made by restores) is collected once no volume stands on it, top first, and kept while one
does. The layers come from a real ``strata backup push`` / ``restore`` through an OCI layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from export_helpers import NODE, SNAP1, make_snapshots  # isort: skip

from csi.backup.index import IMPORTED_PREFIX
from csi.graphdriver.registry import new_driver
from csi.services.volume_ids import make_id, parse_id

REPO = Path(__file__).resolve().parent.parent.parent


def strata(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_CONFIG", "STRATA_DRIVER")}
    env["HOME"] = "/nonexistent"
    return subprocess.run([sys.executable, "-m", "csi.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)


def imported_layers(root: Path) -> list[str]:
    return sorted(l.id for l in new_driver(root, "vfs").driver.layers() if l.id.startswith(IMPORTED_PREFIX))


def test_gc_imported_collects_the_cache_no_volume_uses(ext4_dir: Path) -> None:
    source = ext4_dir / "node-a"
    make_snapshots(new_driver(source, "vfs").driver)  # SNAP0 <- SNAP1: a chain of two layers
    layout = ext4_dir / "layout"
    pushed = strata("backup", "push", make_id(SNAP1, NODE), "--to", f"oci-layout:{layout}:daily", "--root", str(source))
    assert pushed.returncode == 0, pushed.stderr
    reference = json.loads(pushed.stdout)["reference"]
    node_b = ext4_dir / "node-b"

    restored = strata("backup", "restore", reference, "--root", str(node_b), "--driver", "vfs",
                      "--volume-name", "pvc-r", "--node-id", "node-b")
    assert restored.returncode == 0, restored.stderr
    cached = imported_layers(node_b)
    assert len(cached) == 2
    # a volume stands on the chain: nothing to collect, in a dry run or for real
    dry = strata("gc", "--imported", "--dry-run", "--json", "--root", str(node_b), "--driver", "vfs")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["imported_unused"] == []
    assert strata("gc", "--imported", "--root", str(node_b), "--driver", "vfs").returncode == 0
    assert imported_layers(node_b) == cached

    # the volume goes: the whole chain is unused, the dry run lists it top first and changes nothing
    volume_layer, _ = parse_id(json.loads(restored.stdout)["volume_id"])
    new_driver(node_b, "vfs").driver.remove(volume_layer)
    dry = strata("gc", "--imported", "--dry-run", "--json", "--root", str(node_b), "--driver", "vfs")
    assert dry.returncode == 3, dry.stderr
    listed = json.loads(dry.stdout)["imported_unused"]
    assert sorted(listed) == cached and listed[0] == json.loads(restored.stdout)["layer"]
    assert imported_layers(node_b) == cached
    swept = strata("gc", "--imported", "--root", str(node_b), "--driver", "vfs")
    assert swept.returncode == 0, swept.stderr
    assert imported_layers(node_b) == []
    # a later restore pulls the layers again
    again = strata("backup", "restore", reference, "--root", str(node_b), "--driver", "vfs", "--node-id", "node-b")
    assert again.returncode == 0, again.stderr
    assert len(json.loads(again.stdout)["imported"]) == 2
