"""deploy/: the static manifests are the chart's current rendering, and the examples are
valid API objects that use the names the manifests create."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from manifests import REPO, Obj, of_kind, one, parse, validate

DEPLOY = REPO / "deploy"
EXAMPLES = DEPLOY / "examples"


def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def static() -> list[Obj]:
    return parse((DEPLOY / "strata.yaml").read_text())


def example(name: str) -> list[Obj]:
    return parse((EXAMPLES / name).read_text())


def test_static_manifests_are_not_stale() -> None:
    fresh = render_module().render()
    assert (DEPLOY / "strata.yaml").read_text() == fresh, "run .venv/bin/python deploy/render.py"


def test_check_mode_reports_staleness(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(DEPLOY / "render.py"), "--check"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    module = render_module()
    module.OUTPUT = tmp_path / "strata.yaml"
    module.OUTPUT.write_text("# edited by hand\n")
    assert module.main(["--check"]) == 1
    assert module.main([]) == 0 and module.main(["--check"]) == 0


def test_static_manifests_are_valid_and_complete(static: list[Obj]) -> None:
    for obj in static:
        validate(obj)
    assert static[0]["kind"] == "Namespace"
    namespace = static[0]["metadata"]["name"]
    for obj in static:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass",
                               "VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]
    kinds = {o["kind"] for o in static}
    assert {"CSIDriver", "DaemonSet", "Deployment", "StorageClass", "VolumeSnapshotClass"} <= kinds
    # No generated key in the repository: the peer certificate Secret is created by the user.
    assert of_kind(static, "Secret") == []
    volume = next(v for v in one(static, "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "peer-ca")
    assert volume["secret"]["secretName"] == "strata-peer-tls"
    readme = (DEPLOY / "README.md").read_text()
    assert "strata-peer-tls" in readme and "strata-peer.strata-system.svc" in readme


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_is_valid(name: str) -> None:
    objs = example(name)
    assert objs
    for obj in objs:
        validate(obj)


def test_examples_use_what_the_manifests_create(static: list[Obj]) -> None:
    driver = one(static, "CSIDriver")["metadata"]["name"]
    storage_class = one(static, "StorageClass")["metadata"]["name"]
    snapshot_class = one(static, "VolumeSnapshotClass")["metadata"]["name"]
    claims = {}
    for name in ("pvc-pod.yaml", "restore.yaml", "clone.yaml"):
        for pvc in of_kind(example(name), "PersistentVolumeClaim"):
            assert pvc["spec"]["storageClassName"] == storage_class
            claims[pvc["metadata"]["name"]] = pvc
    snapshot = one(example("snapshot.yaml"), "VolumeSnapshot")
    assert snapshot["spec"]["volumeSnapshotClassName"] == snapshot_class
    assert snapshot["spec"]["source"]["persistentVolumeClaimName"] in claims
    assert claims["data-restored"]["spec"]["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot["metadata"]["name"]}
    assert claims["data-clone"]["spec"]["dataSource"]["name"] in claims
    inline = one(example("ephemeral-inline.yaml"), "Pod")["spec"]["volumes"][0]["csi"]
    assert inline["driver"] == driver and inline["volumeAttributes"]["size"].isdigit()
    grown = one(example("expansion.yaml"), "PersistentVolumeClaim")
    original = claims[grown["metadata"]["name"]]
    assert grown["spec"]["storageClassName"] == original["spec"]["storageClassName"]
    size = {"1Gi": 1, "2Gi": 2}
    assert size[grown["spec"]["resources"]["requests"]["storage"]] > \
        size[original["spec"]["resources"]["requests"]["storage"]]
    sc = one(static, "StorageClass")
    assert sc["allowVolumeExpansion"] is True and sc["volumeBindingMode"] == "WaitForFirstConsumer"
    vac = one(example("volume-attributes-class.yaml"), "VolumeAttributesClass")
    assert vac["driverName"] == driver and vac["parameters"] == {"compression": "zstd"}
    group = one(example("group-snapshot.yaml"), "VolumeGroupSnapshot")
    assert group["spec"]["volumeGroupSnapshotClassName"] == one(static, "VolumeGroupSnapshotClass")["metadata"]["name"]
