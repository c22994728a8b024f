"""The chart's monitoring objects (templates/dashboard-configmap.yaml, servicemonitor.yaml):
and the plugin's metrics port, rendered by Helm (helm-python-sdk) and validated against the Kubernetes API schema (ConfigMap)
and the prometheus-operator CRD schema (ServiceMonitor) of tests/deploy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
helm = pytest.importorskip("helm_python", reason="helm-python-sdk (a test extra) renders the chart")
from manifests import CHART, parse, validate  # noqa: E402

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
            {("ConfigMap", "strata-dashboard"), ("ServiceMonitor", "strata")}]


def test_off_by_default() -> None:
    assert ours(objects(CHART, {})) == []


def test_plugin_serves_metrics_on_the_port_the_service_names() -> None:
    objs = objects(CHART, {})
    ds = next(o for o in objs if o["kind"] == "DaemonSet")
    plugin = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "strata")
    assert "--metrics-address=:9840" in plugin["args"]
    assert {"name": "strata-metrics", "containerPort": 9840, "protocol": "TCP"} in plugin["ports"]
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "strata-node-metrics")
    assert {"name": "strata-metrics", "port": 9840, "targetPort": "strata-metrics"} in svc["spec"]["ports"]
    off = objects(CHART, {"metrics": {"port": 0}})
    ds_off = next(o for o in off if o["kind"] == "DaemonSet")
    assert not any(a.startswith("--metrics-address") for c in ds_off["spec"]["template"]["spec"]["containers"]
                   for a in c.get("args", []))


def test_dashboard_configmap_and_service_monitor() -> None:
    chart = CHART
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
    sm = found["ServiceMonitor"]  # one ServiceMonitor: the sidecars' ports and strata's own
    assert {"port": "strata-metrics", "path": "/metrics", "interval": "30s"} in sm["spec"]["endpoints"]
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceMonitor"] == ["strata"]
    # port 0: no strata metrics endpoint
    off = objects(chart, {"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}})
    sm_off = next(o for o in ours(off) if o["kind"] == "ServiceMonitor")
    assert "strata-metrics" not in {e["port"] for e in sm_off["spec"]["endpoints"]}
