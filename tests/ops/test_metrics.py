"""strata's Prometheus metrics with real parts: a real plugin (vfs on ext4) answering real
gRPC calls, its figures on a real /metrics endpoint, ``promtool check metrics`` on a real
scrape, a real Prometheus server on 127.0.0.1 scraping it every second and answering a
histogram quantile and the free bytes through its HTTP API; then every panel of the
Grafana dashboard evaluated on that server and drawn into a PNG.

The plugin runs with ``metrics_address`` (``strata serve --metrics-address``), so the RPC
figures come from the seam itself; the seam's own log line of every call is counted beside
them as an independent witness.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from csi_harness import Harness, code_of
from prometheus_client.parser import text_string_to_metric_families
from promserver import Prometheus

from csi.graphdriver.driver import Capacity
from csi.services.metrics import Metrics, MetricsEndpoint, chain_depths, serve_metrics
from csi.proto import csi_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "strata" / "dashboards" / "strata.json"
WORKLOAD_SECONDS = 20


class RpcLogBridge(logging.Handler):
    """Counts the seam's one JSON line per call (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.calls = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "code" in json.loads(record.getMessage()):
            self.calls += 1


@dataclass
class Setup:
    harness: Harness
    metrics: Metrics
    endpoint: MetricsEndpoint
    prometheus: Prometheus
    started: float
    bridge: RpcLogBridge


def workload(h: Harness, seconds: float) -> None:
    """Real calls for ``seconds``: volumes and snapshots come and go, stats, capacity, errors."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        vol = h.create_volume(f"w-{i}", size=4 << 20).volume_id
        h.controller.GetCapacity(pb.GetCapacityRequest())
        snap = h.snapshot(f"ws-{i}", vol).snapshot_id
        h.create_volume(f"wr-{i}", source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap)))
        if i % 3 == 0:  # the snapshot's layer stays, hidden, under its restored volume
            h.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap))
            h.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol))
        # an unknown volume: NOT_FOUND, an error the dashboard shows
        code = code_of(lambda: h.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=f"vol-{uuid.uuid4().hex}@node-a", volume_path="/nonexistent")))
        assert code is grpc.StatusCode.NOT_FOUND
        time.sleep(0.2)


@pytest.fixture(scope="module")
def setup(scratch_root: Path) -> Iterator[Setup]:
    base = scratch_root / f"metrics-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    h = Harness(base / "plugin", "vfs")
    h.config = replace(h.config, endpoint="", metrics_address="127.0.0.1:0")
    bridge = RpcLogBridge()
    rpc_log = logging.getLogger("strata.rpc")
    rpc_log.addHandler(bridge)
    old_level = rpc_log.level
    rpc_log.setLevel(logging.INFO)
    h.start()
    assert h.handle is not None and h.handle.metrics is not None and h.handle.metrics_endpoint is not None
    metrics, endpoint = h.handle.metrics, h.handle.metrics_endpoint
    prom = None
    try:
        prom = Prometheus(base, f"127.0.0.1:{endpoint.port}")
        started = time.time()
        worker = threading.Thread(target=workload, args=(h, WORKLOAD_SECONDS))
        worker.start()
        worker.join(timeout=WORKLOAD_SECONDS + 120)
        assert not worker.is_alive()
        time.sleep(3)  # a few more scrapes after the last call
        yield Setup(h, metrics, endpoint, prom, started, bridge)
    finally:
        if prom is not None:
            prom.stop()
        rpc_log.removeHandler(bridge)
        rpc_log.setLevel(old_level)
        h.teardown()


def scrape(endpoint: MetricsEndpoint) -> str:
    with urllib.request.urlopen(endpoint.url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (Debian package prometheus, .ci/setup)")
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_promtool_finds_no_problem_in_a_real_scrape(setup: Setup) -> None:
    text = scrape(setup.endpoint)
    done = promtool_check(text)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    # the check is live: a counter named against the conventions is reported
    bad = promtool_check("# HELP strata_bad_count a counter without _total\n# TYPE strata_bad_count counter\n"
                         "strata_bad_count 1\n")
    assert "_total" in bad.stdout + bad.stderr


def test_scrape_tells_the_store(setup: Setup) -> None:
    h = setup.harness
    assert h.handle is not None
    plugin = h.handle.plugin
    got = samples(scrape(setup.endpoint))

    def one(name: str, **labels: str) -> float:
        values = [v for l, v in got[name] if all(l.get(k) == x for k, x in labels.items())]
        assert len(values) == 1, (name, labels, got.get(name))
        return values[0]

    assert all(l["node"] == "node-a" for series in got.values() for l, _ in series if "node" in l)
    assert one("strata_build_info", driver="vfs") == 1
    volumes = plugin.store.volumes()
    assert one("strata_volumes", state="ready", access="filesystem") == len(volumes) > 0
    assert one("strata_snapshots", state="ready") == len(plugin.store.snapshots())
    assert one("strata_volumes_provisioned_bytes") == sum(v.capacity for v in volumes)
    layers = plugin.driver.store.all()
    assert one("strata_layers_hidden") == sum(1 for l in layers if l.hidden)
    assert one("strata_layer_chain_depth_max") == max(chain_depths(layers).values()) >= 2
    ready_frozen = sum(1 for l in layers if l.frozen and not l.hidden and l.state.value == "ready")
    assert one("strata_layers", kind="frozen", state="ready", hidden="false") == ready_frozen
    st = os.statvfs(plugin.driver.home)  # type: ignore[attr-defined]
    assert one("strata_backing_store_size_bytes") == st.f_blocks * st.f_frsize
    assert abs(one("strata_backing_store_free_bytes") - st.f_bavail * st.f_frsize) < 256 << 20
    cap: Capacity = plugin.driver.capacity()
    assert abs(one("strata_capacity_available_bytes") - cap.available_bytes) < 256 << 20
    # every call the seam answered is counted, by method and code
    total = sum(v for _, v in got["strata_rpc_total"])
    assert total == setup.bridge.calls > 0
    assert one("strata_rpc_total", method="NodeGetVolumeStats", code="NOT_FOUND") > 0
    assert one("strata_rpc_duration_seconds_count", method="CreateVolume") == \
        one("strata_rpc_total", method="CreateVolume", code="OK")
    assert one("strata_recovery_actions_total", scope="layers", action="orphans") == 0


def test_prometheus_answers_quantile_and_free_bytes(setup: Setup) -> None:
    prom = setup.prometheus
    p50 = prom.wait_for('histogram_quantile(0.5, sum by (le) (rate(strata_rpc_duration_seconds_bucket[30s])))')
    assert 0 < float(p50[0]["value"][1]) < 30
    free = prom.wait_for('strata_backing_store_free_bytes{node="node-a"}')
    assert free[0]["metric"]["driver"] == "vfs" and free[0]["metric"]["job"] == "strata"
    assert h_free(setup) - (256 << 20) < float(free[0]["value"][1]) < h_free(setup) + (256 << 20)
    targets = prom.api("targets")["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]


def h_free(setup: Setup) -> int:
    assert setup.harness.handle is not None
    st = os.statvfs(setup.harness.handle.plugin.driver.home)  # type: ignore[attr-defined]
    return st.f_bavail * st.f_frsize


def test_dashboard_panels_have_data_and_render(setup: Setup, tmp_path: Path) -> None:
    from dashboard_render import concrete, render, targets
    dashboard = json.loads(DASHBOARD.read_text())
    found = targets(dashboard)
    titles = {p["title"] for p, _ in found}
    assert {"Pool use", "Volumes and snapshots", "RPC latency (p50, p99)", "RPC errors"} <= titles
    prom = setup.prometheus
    for panel, target in found:  # every expression of every panel returns data from the recorded scrapes
        prom.wait_for(concrete(target["expr"]), timeout=30)
    pytest.importorskip("matplotlib", reason="matplotlib (a test extra) draws the dashboard picture")
    end = time.time()
    out = tmp_path / "dashboard.png"
    drawn = render(dashboard, lambda e: prom.query_range(e, setup.started, end, 1), out)
    assert drawn >= len(found)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < out.stat().st_size < 400_000
    if os.environ.get("STRATA_WRITE_DASHBOARD_PNG"):  # refresh the README's picture
        shutil.copy(out, os.environ["STRATA_WRITE_DASHBOARD_PNG"])


def test_thin_pool_figures_from_devicemapper_status() -> None:
    """The devicemapper status strings (csi.graphdriver.devicemapper.driver._status_extra)
    become the thin-pool gauges (a stand-in driver: no device-mapper on this kernel; the
    real driver runs in the kernel lane)."""
    from csi.services.metrics import StoreCollector

    class Pool:
        name = "devicemapper"

        def status(self) -> list[tuple[str, str]]:
            return [("data space used", "1048576 of 10485760 bytes"), ("metadata blocks used", "12 of 512")]

    metrics = Metrics("n", process=False)
    collector = StoreCollector("n", "/nonexistent", Pool(), metrics._errors)  # type: ignore[arg-type]
    got = {m.name: m.samples[0].value for m in collector._thin_pool()}
    assert got == {"strata_thin_pool_data_used_bytes": 1048576, "strata_thin_pool_data_size_bytes": 10485760,
                   "strata_thin_pool_metadata_used_bytes": 12 * 4096,
                   "strata_thin_pool_metadata_size_bytes": 512 * 4096}


def test_endpoint_stops_and_registries_are_separate() -> None:
    a, b = Metrics("a", process=False), Metrics("b", process=False)
    a.observe_rpc("/csi.v1.Identity/Probe", grpc.StatusCode.OK, 0.001)
    ep = serve_metrics("127.0.0.1:0", a.registry)
    text = scrape(ep)
    ep.stop()
    assert 'strata_rpc_total{code="OK",method="Probe",node="a",service="csi.v1.Identity"} 1.0' in text
    from prometheus_client import generate_latest
    assert b"strata_rpc_total{" not in generate_latest(b.registry)
    with pytest.raises(OSError):
        urllib.request.urlopen(ep.url, timeout=2)
