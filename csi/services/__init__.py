"""The CSI services (Identity, Controller, Node, GroupController, SnapshotMetadata), strata's
own Diff export service, the ``strata serve`` server and the ``strata controller`` forwarder.

Modules, one concern each, listed from the top of the imports down (a module imports only
ones below it):

* :mod:`~csi.services.server` — ``strata serve``: flags, :class:`ServeConfig`,
  :func:`start_server` (start-up order: plugin, recovery, listeners, ready; used by tests,
  the demo and the benchmark).
* :mod:`~csi.services.forwarder` — ``strata controller`` (ControllerExpandVolume and
  ControllerModifyVolume routed to the node that owns the volume over the node-to-node
  channel) and the Controller calls a node accepts on that channel.
* :mod:`~csi.services.export` — the Diff export service (GetChain, Changes, DiffSize,
  ExportDiff, ImportDiff) on ``export.sock`` and on the node's one TCP listener (TLS, tokens).
* :mod:`~csi.services.identity`, :mod:`~csi.services.controller`, :mod:`~csi.services.node`,
  :mod:`~csi.services.group`, :mod:`~csi.services.snapshot_metadata` — the CSI services.
* :mod:`~csi.services.sources` — content sources of CreateVolume: local snapshots and
  volumes, another node's (pulled over the channel), OCI backups; background transfers.
* :mod:`~csi.services.metrics` — Prometheus metrics: the seam's observer and a scrape-time
  collector over the driver and the records.
* :mod:`~csi.services.recovery` — start-up reconciliation of records, layers and mounts.
* :mod:`~csi.services.plugin` — what the services share: the driver (through the
  :class:`csi.graphdriver.driver.Driver` contract only), the state store, locks, topology,
  readiness.
* :mod:`~csi.services.requests` — pure request validation (required fields, paths,
  capacity, parameters, capabilities).
* :mod:`~csi.services.targets` — mount targets: prepare, bind, remove.
* :mod:`~csi.services.listen` — what every server process shares: the gRPC server with the
  seam, the unix socket, common flags, the signal-draining ``main`` loop, the default CSI
  driver name.
* :mod:`~csi.services.rpclog` — the interceptor: one structured log line per RPC (secrets
  redacted) and the error seam around every handler kind, unary or streaming.
* :mod:`~csi.services.status` — the one error mapping (:mod:`csi.errors` -> gRPC codes).
* :mod:`~csi.services.volume_ids` — ``<layer-id>@<node-id>`` IDs, the owning node.
* :mod:`~csi.services.locks` — per-key non-blocking locks (racing calls get ABORTED).

State lives in :mod:`csi.state.store` (``<root>/state.db``); node facts from Kubernetes in
:mod:`csi.kube`; authenticated TCP (TLS, ServiceAccount tokens, dialing other nodes) in
:mod:`csi.peers`.
"""
