"""What strata reads from its Node object through the official Kubernetes client.

* :func:`driver_from_node_label` — the per-node layered driver choice: the value of a
  Node label (``strata.csi.dev/driver`` by default, the chart's ``nodeDriverLabel``),
  read once at start-up by ``strata serve`` when its driver is ``auto``.
* :func:`resolve_driver` — the whole start-up decision: an explicit ``--driver`` (or
  ``STRATA_DRIVER``) wins; with ``auto`` and ``STRATA_NODE_DRIVER_LABEL`` set, the label's
  value (when present); else ``auto`` (the registry's priority list).
* :func:`node_internal_ip` — the Node's InternalIP, where other strata processes reach a
  node plugin's peer listener (:class:`csi.peers.kubedial.KubernetesDialer`).

The client is configured in-cluster (service-account token and CA under
``/var/run/secrets/kubernetes.io/serviceaccount``, ``KUBERNETES_SERVICE_HOST/PORT``); outside
a pod, from the file ``KUBECONFIG`` names (development, tests); unless the caller passes an
``ApiClient``. Failures are the project's errors: a Node that does not
exist is :class:`~csi.errors.NotFound`, an unreachable or refusing API server is
:class:`~csi.errors.FailedPrecondition`, a label naming no known driver is
:class:`~csi.errors.InvalidArgument` — start-up stops and says which label to fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from csi.errors import FailedPrecondition, InvalidArgument, NotFound

DEFAULT_LABEL = "strata.csi.dev/driver"
ENV_LABEL = "STRATA_NODE_DRIVER_LABEL"
ENV_DRIVER = "STRATA_DRIVER"  # the registry's explicit choice (csi.graphdriver.registry.ENV_DRIVER)
KNOWN_DRIVERS = ("vfs", "overlay", "aufs", "btrfs", "devicemapper")


def incluster_api_client() -> object:
    """A ``kubernetes.client.ApiClient`` from the pod's service account, else from ``KUBECONFIG``."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    kubeconfig = os.environ.get("KUBECONFIG", "")
    if kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            return config.new_client_from_config(config_file=kubeconfig)
        except (ConfigException, OSError) as exc:
            raise FailedPrecondition(f"KUBECONFIG={kubeconfig}: {exc}") from exc
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        raise FailedPrecondition(f"no in-cluster Kubernetes configuration: {exc}") from exc
    return client.ApiClient(configuration)


def _read_node(node_name: str, api_client: object | None) -> object:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if not node_name:
        raise InvalidArgument("node name is empty (set --node-id / NODE_NAME)")
    api = client.CoreV1Api(api_client if api_client is not None else incluster_api_client())
    try:
        return api.read_node(node_name, _request_timeout=15)
    except ApiException as exc:
        if exc.status == 404:
            raise NotFound(f"node {node_name!r} does not exist in the cluster") from exc
        raise FailedPrecondition(f"reading node {node_name!r}: API server answered {exc.status} "
                                 f"{exc.reason}") from exc
    except (HTTPError, OSError) as exc:
        raise FailedPrecondition(f"reading node {node_name!r}: API server unreachable: {exc}") from exc


def driver_from_node_label(node_name: str, label: str = DEFAULT_LABEL,
                           api_client: object | None = None) -> str | None:
    """The driver the Node's ``label`` names, or None when the label is absent or empty."""
    node = _read_node(node_name, api_client)
    labels: Mapping[str, str] = node.metadata.labels or {}  # type: ignore[attr-defined]
    value = labels.get(label, "").strip()
    if not value:
        return None
    if value != "auto" and value not in KNOWN_DRIVERS:
        raise InvalidArgument(f"node {node_name} label {label}={value!r} names no driver; "
                              f"use one of auto, {', '.join(KNOWN_DRIVERS)}")
    return None if value == "auto" else value


def resolve_driver(driver: str, node_name: str, environ: Mapping[str, str] | None = None,
                   api_client: object | None = None) -> str:
    """The driver ``strata serve`` should use: explicit > Node label (if enabled) > auto."""
    env = os.environ if environ is None else environ
    if driver == "auto" and env.get(ENV_DRIVER, "auto") != "auto":
        return env[ENV_DRIVER]
    label = env.get(ENV_LABEL, "").strip()
    if driver != "auto" or not label:
        return driver
    return driver_from_node_label(node_name, label, api_client) or "auto"


def node_internal_ip(node_name: str, api_client: object | None = None) -> str:
    """The Node's InternalIP (NotFound when the Node has none)."""
    node = _read_node(node_name, api_client)
    for address in node.status.addresses or ():  # type: ignore[attr-defined]
        if address.type == "InternalIP" and address.address:
            return str(address.address)
    raise NotFound(f"node {node_name!r} reports no InternalIP")
