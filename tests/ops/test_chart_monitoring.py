"""The chart's monitoring objects (templates/dashboard-configmap.yaml, servicemonitor.yaml):
rendered by Helm (helm-python-sdk) with the values keys they read — applied here to a copy
of the chart as :data:`VALUES_PATCH` / :data:`SCHEMA_PATCH` until values.yaml and
values.schema.json carry them — and validated against the Kubernetes API schema (ConfigMap)
and the prometheus-operator CRD schema (ServiceMonitor) of tests/deploy."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
helm = pytest.importorskip("helm_python", reason="helm-python-sdk (a test extra) renders the chart")
from manifests import CHART, parse, validate  # noqa: E402

# what values.yaml's `metrics:` gains (the chart-hygiene helper merges it)
VALUES_PATCH: dict[str, Any] = {
    "port": 9840,
    "dashboard": {"enabled": False, "namespace": "", "labels": {"grafana_dashboard": "1"}, "annotations": {}},
}
SCHEMA_PATCH: dict[str, Any] = {
    "port": {"type": "integer", "minimum": 0, "maximum": 65535},
    "dashboard": {"type": "object", "additionalProperties": False, "properties": {
        "enabled": {"type": "boolean"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
}


def patched_chart(tmp_path: Path) -> Path:
    chart = tmp_path / "strata"
    shutil.copytree(CHART, chart)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    for key, value in VALUES_PATCH.items():
        values["metrics"].setdefault(key, value)
    (chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    schema = json.loads((chart / "values.schema.json").read_text())
    for key, value in SCHEMA_PATCH.items():
        schema["properties"]["metrics"]["properties"].setdefault(key, value)
    (chart / "values.schema.json").write_text(json.dumps(schema, indent=2))
    return chart


def objects(chart: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(chart) as c:
        rendered = c.render(values=values, name="strata", namespace="strata-system", is_install=True)
    out: list[dict[str, Any]] = []
    for name, text in sorted(rendered.items()):
        if not name.endswith("NOTES.txt"):
            out += parse(text)
    return out


def ours(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if (o["kind"], o["metadata"]["name"]) in
            {("ConfigMap", "strata-dashboard"), ("ServiceMonitor", "strata-plugin")}]


def test_off_by_default_and_without_the_values_keys(tmp_path: Path) -> None:
    assert ours(objects(CHART, {})) == []  # today's values.yaml: the templates stay silent
    assert ours(objects(patched_chart(tmp_path), {})) == []


def test_dashboard_configmap_and_service_monitor(tmp_path: Path) -> None:
    chart = patched_chart(tmp_path)
    objs = objects(chart, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                                       "dashboard": {"enabled": True, "namespace": "monitoring"}}})
    found = {o["kind"]: o for o in ours(objs)}
    assert set(found) == {"ConfigMap", "ServiceMonitor"}
    for obj in found.values():
        validate(obj)
    cm = found["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads(cm["data"]["strata.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "strata.json").read_text())
    sm = found["ServiceMonitor"]
    assert sm["spec"]["endpoints"] == [{"port": "strata-metrics", "path": "/metrics", "interval": "30s"}]
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "node"
    assert sm["metadata"]["labels"]["release"] == "kps"
    # the sidecars' ServiceMonitor (metrics.yaml) is still there, under its own name
    assert sorted(o["metadata"]["name"] for o in objs if o["kind"] == "ServiceMonitor") == ["strata", "strata-plugin"]
    # port 0: no strata metrics, no ServiceMonitor for them
    off = objects(chart, {"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}})
    assert [o for o in ours(off) if o["kind"] == "ServiceMonitor"] == []
