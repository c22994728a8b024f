"""Backups as content sources and CreateSnapshot with a backup target, through Debian's real
``docker-registry`` (basic auth from the request's secrets), checked with ``skopeo``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest
from layertree import assert_same_tree, populate

from sources_support import MiB, Node, Registry
from test_cross_node import pulls, snapshot_source

from csi.proto import csi_pb2 as pb

SECRET_MARK = "s3cret-Pa55"  # the registry password of tests/backup/conftest.py


def secrets_for(registry: Registry) -> dict[str, str]:
    return {".dockerconfigjson": registry.docker_config().decode()}


def wait_ready(node: Node, name: str, volume_id: str, timeout: float = 120, **extra: object) -> list[pb.Snapshot]:
    """Repeat CreateSnapshot as the snapshotter does until ready_to_use; returns the answers."""
    seen = []
    end = time.monotonic() + timeout
    while True:
        snap = node.snapshot(name, volume_id, **extra)
        seen.append(snap)
        if snap.ready_to_use:
            return seen
        assert time.monotonic() < end, "the backup upload never finished"
        time.sleep(0.1)


def skopeo_inspect(registry: Registry, repo: str, tag: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    return subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", f"backup-user:{SECRET_MARK}",
                           f"docker://{registry.host}/{repo}:{tag}"], capture_output=True, text=True, timeout=60)


def backed_up_snapshot(a: Node, registry: Registry, repo: str) -> tuple[str, str, object]:
    """A snapshot on A with a backup in ``repo``; returns (snapshot id, backup reference, mount)."""
    vol = a.create_volume("pvc-src", size=32 * MiB).volume_id
    mount = a.mounted(vol, "pod-src")
    populate(mount)
    params = {"backupTarget": f"oci://{registry.host}/{repo}", "backupCompression": "zstd"}
    answers = wait_ready(a, "snap-backed", vol, parameters=params, secrets=secrets_for(registry))
    assert not answers[0].ready_to_use, "the first answer came before the upload could have finished"
    assert len({s.snapshot_id for s in answers}) == 1
    snap = answers[-1].snapshot_id
    ref = re.findall(rf"backed up as (oci://\S+@sha256:[0-9a-f]{{64}})", a.log_text())[-1]
    return snap, ref, mount


def test_create_snapshot_with_backup_target_then_restore_anywhere(nodes: Callable[..., Node],
                                                                  registry_basic: Registry) -> None:
    a = nodes("node-a", "overlay")
    c = nodes("node-c", "vfs")  # a fresh node root, another driver, no link to node-a needed
    a.start(), c.start()
    snap, ref, mount = backed_up_snapshot(a, registry_basic, "team/vol")
    layer = snap.split("@")[0]
    inspected = skopeo_inspect(registry_basic, "team/vol", layer)
    assert inspected.returncode == 0, inspected.stderr
    assert ref.endswith(json.loads(inspected.stdout)["Digest"])

    # without credentials the registry refuses: nothing is made
    with pytest.raises(grpc.RpcError) as err:
        c.create_until_done("pvc-nocreds", snapshot_source(ref))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    volume, _ = c.create_until_done("pvc-restored", snapshot_source(ref), size=MiB,
                                    secrets=secrets_for(registry_basic))
    assert volume.capacity_bytes == 32 * MiB  # the backup's capacity is the minimum
    assert volume.volume_context["strata.csi.dev/restored-from"] == ref
    assert_same_tree(mount, c.mounted(volume.volume_id, "pod-restored"))
    assert pulls(c)[-1][0] >= 1
    # cached: a second restore pulls nothing
    again, _ = c.create_until_done("pvc-again", snapshot_source(ref), secrets=secrets_for(registry_basic))
    imported, reused, moved = pulls(c)[-1]
    assert (imported, moved) == (0, 0) and reused >= 1, pulls(c)
    assert_same_tree(mount, c.mounted(again.volume_id, "pod-again"))
    # the backup as a statically provisioned snapshot: ready, with its capacity
    got = c.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=ref, secrets=secrets_for(registry_basic)))
    assert got.snapshot.ready_to_use and got.snapshot.size_bytes == 32 * MiB
    # secrets never reach the logs
    assert SECRET_MARK not in a.log_text() and SECRET_MARK not in c.log_text()

    # DeleteSnapshot removes the local layers and the tag
    a.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap, secrets=secrets_for(registry_basic)))
    assert skopeo_inspect(registry_basic, "team/vol", layer).returncode != 0
    assert layer not in a.layers()


def test_owner_gone_restores_from_the_backup(nodes: Callable[..., Node], registry_basic: Registry) -> None:
    a, b = nodes("node-a", "vfs"), nodes("node-b", "vfs")
    a.start(), b.start()
    snap, ref, mount = backed_up_snapshot(a, registry_basic, "team/fallback")
    expected = a.mounted(a.create_volume("pvc-local", size=32 * MiB, source=snapshot_source(snap)).volume_id, "pl")
    a.kill()
    # without a backup target in the StorageClass: UNAVAILABLE naming the owner
    with pytest.raises(grpc.RpcError) as err:
        b.create_until_done("pvc-x", snapshot_source(snap), size=32 * MiB)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "node node-a" in err.value.details()
    volume, _ = b.create_until_done("pvc-x", snapshot_source(snap), size=32 * MiB,
                                    parameters={"backupTarget": f"oci://{registry_basic.host}/team/fallback"},
                                    secrets=secrets_for(registry_basic))
    note = volume.volume_context["strata.csi.dev/restore-note"]
    assert "node node-a" in note and "restored from its backup" in note and ref.split("@")[1] in note
    assert_same_tree(expected, b.mounted(volume.volume_id, "pod-x"))
