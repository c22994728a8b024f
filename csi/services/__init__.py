"""The CSI services (Identity, Controller, Node) and the ``strata serve`` server."""
