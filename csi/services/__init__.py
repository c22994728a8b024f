"""The CSI services (Identity, Controller, Node) and the ``strata serve`` server.

Modules, one concern each:

* :mod:`~csi.services.server` — ``strata serve``: flags, :class:`ServeConfig`,
  :func:`start_server` (used by tests, the demo and the benchmark), SIGTERM drain.
* :mod:`~csi.services.plugin` — what the services share: driver, state store, locks,
  topology, validation of capabilities and parameters.
* :mod:`~csi.services.identity`, :mod:`~csi.services.controller`, :mod:`~csi.services.node`
  — the three CSI services.
* :mod:`~csi.services.recovery` — start-up reconciliation of records, layers and mounts.
* :mod:`~csi.services.status` — the one error seam (project errors -> gRPC codes).
* :mod:`~csi.services.rpclog` — one structured log line per RPC, secrets redacted.
* :mod:`~csi.services.volume_ids` — ``<layer-id>@<node-id>`` IDs, the owning node.
* :mod:`~csi.services.locks` — per-key non-blocking locks (racing calls get ABORTED).

State lives in :mod:`csi.state.store` (``<root>/state.db``).
"""
