"""Helpers for the deployment tests: render the chart, validate objects, read them back."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from crd_schemas import SCHEMAS

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "strata"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas here.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

Obj = dict[str, Any]


def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(values: dict[str, Any] | None = None, namespace: str = "strata-system") -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values or {}, name="strata", namespace=namespace, is_install=True)


def objects(values: dict[str, Any] | None = None) -> list[Obj]:
    out: list[Obj] = []
    for name, text in sorted(render(values).items()):
        if not name.endswith("NOTES.txt"):
            out += parse(text)
    return out


def validate(obj: Obj) -> None:
    """Validate against the Kubernetes API schemas, or the CRD schema for custom kinds."""
    schema = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        jsonschema.validate(obj, schema)
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # a kind newer than the oldest supported Kubernetes (VolumeAttributesClass v1 is GA
            # in 1.34): it must still validate against the newest schemas
            if version == KUBE_VERSIONS[-1]:
                raise


def of_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(pod_owner: Obj, name: str) -> Obj:
    for c in pod_owner["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"{pod_owner['metadata']['name']} has no container {name}")


def flag(c: Obj, name: str) -> str | None:
    """Value of ``--name=value`` among a container's args (``"true"`` for a bare flag)."""
    for arg in c.get("args", []):
        key, sep, value = arg.partition("=")
        if key in (f"--{name}", f"-{name}"):
            return value if sep else "true"
    return None
