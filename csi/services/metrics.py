"""Prometheus metrics of ``strata serve`` (prometheus-client), in the ecosystem's conventions:
``strata_`` prefix, base units (bytes, seconds), ``_total`` counters, and a constant ``node``
label on every strata series (the Python client has no registry-wide constant labels, so
each family carries ``node`` itself).

Contract::

    metrics = Metrics(node="node-1")                # its own CollectorRegistry, no globals
    metrics.watch(root, driver)                     # scrape-time figures of this root
    metrics.record_reconciliation(driver.recovered) # what the driver's start-up sweep did
    metrics.record_recovery("volumes_rolled_back", 2)   # CSI-level recovery actions
    metrics.observe_rpc("/csi.v1.Node/NodeStageVolume", "OK", 0.012)   # from the RPC seam
    metrics.observe_transfer("export", nbytes, seconds)  # diff export / backup / restore
    endpoint = serve_metrics(":9840", metrics.registry)  # GET /metrics; endpoint.stop()

Figures computed at scrape time (:class:`StoreCollector`, cheap: one ``statvfs``, the
driver's ``capacity()`` and ``status()``, a read-only read of the layer records and of the
CSI records) — nothing is cached, so a scrape always tells the present:

========================================== ===== ==========================================
strata_backing_store_size_bytes            gauge size of the filesystem holding the home
strata_backing_store_free_bytes            gauge free to unprivileged users (statvfs f_bavail)
strata_backing_store_used_bytes            gauge used (f_blocks - f_bfree)
strata_capacity_available_bytes            gauge what GetCapacity tells the scheduler
strata_capacity_total_bytes                gauge GetCapacity's maximum_volume_size
strata_thin_pool_data_{used,size}_bytes    gauge devicemapper only: thin-pool data space
strata_thin_pool_metadata_{used,size}_bytes gauge devicemapper only (4 KiB metadata blocks)
strata_layers                              gauge layer records by kind, state, hidden
strata_layers_hidden                       gauge hidden layers awaiting their children
strata_layer_chain_depth_max               gauge layers in the deepest chain (1: no parent)
strata_volumes                             gauge CSI volume records by state, access
strata_volumes_provisioned_bytes           gauge sum of the volumes' requested capacity
strata_snapshots                           gauge CSI snapshot records by state
strata_publications                        gauge stagings/publications by kind, state
strata_collect_errors_total                counter scrape-time reads that failed, by part
========================================== ===== ==========================================

Instrumented (their APIs are called by the code that does the work):
``strata_rpc_duration_seconds`` (histogram by service, method), ``strata_rpc_total``
(by service, method, grpc code), ``strata_recovery_actions_total`` (by scope
``layers``/``csi`` and action), ``strata_transfer_bytes_total`` /
``strata_transfer_duration_seconds`` / ``strata_transfers_total`` (by operation and
result), ``strata_build_info``. The process collector (``process_*``) is registered too.

Per-PVC usage is not here: kubelet exports it (``kubelet_volume_stats_*``) from
NodeGetVolumeStats, which strata answers.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from csi import __version__
from csi.errors import InvalidArgument
from csi.graphdriver.driver import Driver, Layer, Reconciliation
from csi.graphdriver.registry import home_of
from csi.state.readonly import read_records
from csi.state.store import RecordState

__all__ = ["Metrics", "StoreCollector", "MetricsEndpoint", "serve_metrics", "chain_depths", "RPC_BUCKETS"]

log = logging.getLogger("strata.metrics")

# CSI calls range from sub-millisecond (Probe) to minutes (a copying clone on vfs)
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TRANSFER_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0)
THIN_METADATA_BLOCK = 4096  # dm-thin reports metadata in 4 KiB blocks
_OF = re.compile(r"^\s*(\d+)\s+of\s+(\d+)")


def chain_depths(layers: Iterable[Layer]) -> dict[str, int]:
    """Each layer's chain length (itself and its ancestors); a dangling parent ends a chain."""
    parent = {l.id: l.parent for l in layers}
    depth: dict[str, int] = {}
    for start in parent:
        path, node = [], start
        while node is not None and node in parent and node not in depth and node not in path:
            path.append(node)
            node = parent[node]
        base = depth.get(node, 0) if node is not None else 0
        for lid in reversed(path):
            base += 1
            depth[lid] = base
    return depth


def _split_method(method: str) -> tuple[str, str]:
    """``/csi.v1.Node/NodeStageVolume`` -> (``csi.v1.Node``, ``NodeStageVolume``)."""
    service, _, name = method.strip("/").rpartition("/")
    return (service or "unknown"), (name or "unknown")


class StoreCollector(Collector):
    """Scrape-time figures of one root and its driver (see the module docstring)."""

    def __init__(self, node: str, root: str | os.PathLike[str], driver: Driver,
                 errors: Counter) -> None:
        self.node = node
        self.root = Path(root)
        self.driver = driver
        self.home = Path(getattr(driver, "home", home_of(self.root, driver.name)))
        self._errors = errors

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=("node", "driver", *labels))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families vary (thin pool only on devicemapper): no pre-registration checks

    def collect(self) -> Iterator[Metric]:
        for part, produce in (("filesystem", self._filesystem), ("capacity", self._capacity),
                              ("thin_pool", self._thin_pool), ("layers", self._layers), ("records", self._records)):
            try:
                families = list(produce())
            except Exception as exc:  # noqa: BLE001 - a failed read must not break the scrape
                log.warning("metrics: cannot collect %s: %s", part, exc)
                self._errors.labels(node=self.node, part=part).inc()
                continue
            yield from families

    def _base(self) -> tuple[str, str]:
        return self.node, self.driver.name

    def _filesystem(self) -> Iterator[Metric]:
        st = os.statvfs(self.home)
        size = self._gauge("strata_backing_store_size_bytes", "Size of the filesystem holding the driver's home.")
        free = self._gauge("strata_backing_store_free_bytes",
                           "Bytes free to unprivileged users on the filesystem holding the driver's home (statvfs).")
        used = self._gauge("strata_backing_store_used_bytes", "Bytes used on the filesystem holding the driver's home.")
        size.add_metric(self._base(), st.f_blocks * st.f_frsize)
        free.add_metric(self._base(), st.f_bavail * st.f_frsize)
        used.add_metric(self._base(), (st.f_blocks - st.f_bfree) * st.f_frsize)
        yield from (size, free, used)

    def _capacity(self) -> Iterator[Metric]:
        cap = self.driver.capacity()
        avail = self._gauge("strata_capacity_available_bytes",
                            "available_capacity GetCapacity reports to the scheduler (CSIStorageCapacity).")
        total = self._gauge("strata_capacity_total_bytes", "maximum_volume_size GetCapacity reports.")
        avail.add_metric(self._base(), cap.available_bytes)
        total.add_metric(self._base(), cap.total_bytes)
        yield from (avail, total)

    def _thin_pool(self) -> Iterator[Metric]:
        if self.driver.name != "devicemapper":
            return
        status = dict(self.driver.status())
        data = _OF.match(status.get("data space used", ""))
        meta = _OF.match(status.get("metadata blocks used", ""))
        if data is None or meta is None:
            raise ValueError(f"unexpected devicemapper status: {status}")
        for name, doc, value in (
            ("strata_thin_pool_data_used_bytes", "Thin-pool data space in use.", int(data[1])),
            ("strata_thin_pool_data_size_bytes", "Thin-pool data space.", int(data[2])),
            ("strata_thin_pool_metadata_used_bytes", "Thin-pool metadata space in use.",
             int(meta[1]) * THIN_METADATA_BLOCK),
            ("strata_thin_pool_metadata_size_bytes", "Thin-pool metadata space.", int(meta[2]) * THIN_METADATA_BLOCK),
        ):
            g = self._gauge(name, doc)
            g.add_metric(self._base(), value)
            yield g

    def _layers(self) -> Iterator[Metric]:
        layers = type(self.driver).read_layers(self.home)
        by = Tally((l.kind.value, l.state.value, "true" if l.hidden else "false") for l in layers)
        g = self._gauge("strata_layers", "Layer records by kind (writable, frozen), state and whether hidden.",
                        ("kind", "state", "hidden"))
        for kind in ("writable", "frozen"):
            for state in ("creating", "ready", "removing"):
                for hidden in ("false", "true"):
                    g.add_metric((*self._base(), kind, state, hidden), by[(kind, state, hidden)])
        yield g
        hidden = self._gauge("strata_layers_hidden", "Hidden layers (deleted, with children) awaiting their children.")
        hidden.add_metric(self._base(), sum(1 for l in layers if l.hidden))
        yield hidden
        depth = self._gauge("strata_layer_chain_depth_max", "Layers in the deepest chain (a layer without parent: 1).")
        depth.add_metric(self._base(), max(chain_depths(layers).values(), default=0))
        yield depth

    def _records(self) -> Iterator[Metric]:
        rec = read_records(self.root)
        states = [s.value for s in RecordState]
        vols = self._gauge("strata_volumes", "CSI volume records by state and access type.", ("state", "access"))
        by_vol = Tally((v.state.value, "block" if v.block else "filesystem") for v in rec.volumes)
        for state in states:
            for access in ("filesystem", "block"):
                vols.add_metric((*self._base(), state, access), by_vol[(state, access)])
        yield vols
        prov = self._gauge("strata_volumes_provisioned_bytes", "Sum of the capacity the volumes were created with.")
        prov.add_metric(self._base(), sum(v.capacity for v in rec.volumes))
        yield prov
        snaps = self._gauge("strata_snapshots", "CSI snapshot records by state.", ("state",))
        by_snap = Tally(s.state.value for s in rec.snapshots)
        for state in states:
            snaps.add_metric((*self._base(), state), by_snap[state])
        yield snaps
        pubs = self._gauge("strata_publications", "Stagings (kind=stage) and publications (kind=publish) by state.",
                           ("kind", "state"))
        by_pub = Tally((p.kind, p.state.value) for p in rec.publications)
        for kind in ("stage", "publish"):
            for state in states:
                pubs.add_metric((*self._base(), kind, state), by_pub[(kind, state)])
        yield pubs


class Metrics:
    """strata's metrics in a :class:`CollectorRegistry` of their own (``self.registry``)."""

    def __init__(self, node: str, *, process: bool = True) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._info = Gauge("strata_build_info", "strata's version and the driver this node runs (value 1).",
                           ("node", "version", "driver"), registry=r)
        self._rpc_seconds = Histogram("strata_rpc_duration_seconds", "Time to answer a gRPC call, by method.",
                                      ("node", "service", "method"), buckets=RPC_BUCKETS, registry=r)
        self._rpc_total = Counter("strata_rpc", "gRPC calls answered, by method and status code.",
                                  ("node", "service", "method", "code"), registry=r)
        self._recovery = Counter("strata_recovery_actions", "Repairs made by start-up recovery, by scope and action.",
                                 ("node", "scope", "action"), registry=r)
        self._transfer_bytes = Counter("strata_transfer_bytes", "Bytes moved by diff export, backup and restore.",
                                       ("node", "operation"), registry=r)
        self._transfer_seconds = Histogram("strata_transfer_duration_seconds",
                                           "Duration of diff export, backup and restore operations.",
                                           ("node", "operation"), buckets=TRANSFER_BUCKETS, registry=r)
        self._transfers = Counter("strata_transfers", "Diff export, backup and restore operations, by result.",
                                  ("node", "operation", "result"), registry=r)
        self._errors = Counter("strata_collect_errors", "Scrape-time reads that failed, by part.",
                               ("node", "part"), registry=r)
        for scope, actions in (("layers", Reconciliation.__dataclass_fields__), ):
            for action in actions:
                if action != "dry_run":  # every action shows (0) before anything is recovered
                    self._recovery.labels(node, scope, action)
        if process:
            ProcessCollector(registry=r)
        self._watched: StoreCollector | None = None
        self._lock = threading.Lock()

    def watch(self, root: str | os.PathLike[str], driver: Driver) -> None:
        """Report ``root`` and ``driver`` at every scrape (once per Metrics)."""
        with self._lock:
            if self._watched is not None:
                raise InvalidArgument("metrics already watch a root")
            self._watched = StoreCollector(self.node, root, driver, self._errors)
            self.registry.register(self._watched)
        self._info.labels(self.node, __version__, driver.name).set(1)

    def observe_rpc(self, method: str, code: Any, seconds: float) -> None:
        """One answered call: ``method`` as gRPC names it (``/csi.v1.Node/NodeStageVolume``),
        ``code`` a ``grpc.StatusCode`` or its name (``"OK"``), ``seconds`` its duration."""
        service, name = _split_method(method)
        code_name = getattr(code, "name", None) or str(code)
        self._rpc_seconds.labels(self.node, service, name).observe(max(0.0, seconds))
        self._rpc_total.labels(self.node, service, name, code_name).inc()

    def record_recovery(self, kind: str, n: int = 1) -> None:
        """``n`` CSI-level recovery actions of ``kind`` (e.g. ``publications_undone``)."""
        if n < 0:
            raise InvalidArgument(f"a recovery count cannot be negative, got {n}")
        self._recovery.labels(self.node, "csi", kind).inc(n)

    def record_reconciliation(self, rec: Reconciliation | None) -> None:
        """What the driver's start-up sweep did (``driver.recovered``; None: no sweep ran)."""
        if rec is None or rec.dry_run:
            return
        for action in Reconciliation.__dataclass_fields__:
            if action != "dry_run":
                self._recovery.labels(self.node, "layers", action).inc(len(getattr(rec, action)))

    def observe_transfer(self, operation: str, nbytes: int, seconds: float, ok: bool = True) -> None:
        """One diff export / backup / restore (``operation``) of ``nbytes`` in ``seconds``."""
        self._transfer_bytes.labels(self.node, operation).inc(max(0, nbytes))
        self._transfer_seconds.labels(self.node, operation).observe(max(0.0, seconds))
        self._transfers.labels(self.node, operation, "success" if ok else "failure").inc()


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint; ``stop()`` (or calling it) shuts it down."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host or '127.0.0.1'}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    __call__ = stop


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (every interface) or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"metrics address {address!r}: expected HOST:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(address: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` on ``http://address/metrics`` (port 0: a free one) in a thread."""
    host, port = parse_address(address)
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("serving metrics on %s:%d/metrics", host, bound)
    return MetricsEndpoint(host, bound, server, thread)
