"""What every CSI service shares: configuration, the layered driver, the state store,
the per-key locks, readiness, and the checks that need the node (topology, the driver's
name and abilities).

Contract: :class:`Plugin` is built once per server from a :class:`PluginConfig`; building
it selects the driver (:func:`csi.graphdriver.registry.new_driver`) and opens
``<root>/state.db``. The services reach the driver only through the contract
(:class:`csi.graphdriver.driver.Driver`). The plugin is not ``ready`` (Probe answers
false) until its owner has run start-up recovery (:func:`csi.services.recovery.recover`,
called by :func:`csi.services.server.start_server` before the socket is served) and set
:attr:`Plugin.ready`. Request validation itself lives in :mod:`csi.services.requests`;
the methods here bind it to this node's driver.

Content sources that live elsewhere (another node's snapshot or volume, an OCI backup) are
pulled through ``dialer`` (:class:`csi.peers.dial.PeerDialer`, built by the server from the
node-to-node channel's settings; ``None``: this plugin cannot reach other nodes, and such a
source is UNAVAILABLE) and imported into the driver with the node's export cache
(``index``, ``<driver home>/backup-index.json``, shared with ``strata backup`` and the Diff
export service). ``transfer_wait_seconds`` is how long a CreateVolume waits for such a pull
before answering ABORTED (operation pending) while it goes on in the background
(``STRATA_TRANSFER_WAIT_SECONDS`` overrides the default).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from csi.backup.digests import Digests
from csi.backup.index import ExportIndex
from csi.errors import ResourceExhausted
from csi.graphdriver.driver import Driver
from csi.graphdriver.registry import Selection, home_of, new_driver
from csi.peers.dial import PeerDialer
from csi.proto import csi_pb2
from csi.services import requests
from csi.services.listen import DEFAULT_DRIVER_NAME
from csi.services.locks import KeyLocks
from csi.services.requests import MountRequest
from csi.services.sources import ContentSources, Uploads
from csi.services.volume_ids import check_node_id, make_id
from csi.state.store import StateStore

log = logging.getLogger("strata.plugin")


@dataclass(frozen=True)
class PluginConfig:
    root: Path
    node_id: str
    driver: str = "auto"
    driver_name: str = DEFAULT_DRIVER_NAME
    driver_options: Mapping[str, str] = field(default_factory=dict)
    max_volumes_per_node: int = 0
    digest_snapshots: bool = False  # hash each new snapshot's chain in the background (csi.backup.digests)
    transfer_wait_seconds: float = field(
        default_factory=lambda: float(os.environ.get("STRATA_TRANSFER_WAIT_SECONDS", DEFAULT_TRANSFER_WAIT)))


DEFAULT_TRANSFER_WAIT = 8.0  # below external-provisioner's default --timeout (10 s)
INDEX_NAME = "backup-index.json"


class Plugin:
    def __init__(self, config: PluginConfig, dialer: PeerDialer | None = None) -> None:
        check_node_id(config.node_id)
        self.config = config
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.selection: Selection = new_driver(self.root, None if config.driver == "auto" else config.driver,
                                               config.driver_options)
        self.driver: Driver = self.selection.driver
        self.store = StateStore(self.root)
        self.dialer = dialer
        self.index = ExportIndex(home_of(self.root, self.driver.name) / INDEX_NAME)
        self.digests = Digests(self.driver, self.index)
        self.sources = ContentSources(self.driver, self.store, config.node_id, dialer, self.index,
                                      config.transfer_wait_seconds)
        self.uploads = Uploads(self.driver, self.store, config.node_id, self.index)
        self.locks = KeyLocks()
        self.ready = threading.Event()  # set once start-up recovery has run
        self.paging_key = os.urandom(32)  # signs paging tokens (requests.issue_token); new per start

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def topology(self) -> dict[str, str]:
        name = self.config.driver_name
        return {f"{name}/node": self.node_id, f"{name}/layered-driver": self.driver.name}

    def topology_matches(self, segments: Mapping[str, str]) -> bool:
        ours = self.topology()
        return all(ours.get(key) == value for key, value in segments.items())

    def check_accessibility(self, requirements: csi_pb2.TopologyRequirement) -> None:
        requisite = list(requirements.requisite)
        if requisite and not any(self.topology_matches(t.segments) for t in requisite):
            raise ResourceExhausted(
                f"accessibility requirements exclude this node ({self.node_id}): volumes live on the node "
                "that serves them; schedule with WaitForFirstConsumer")

    def check_parameters(self, parameters: Mapping[str, str]) -> dict[str, str]:
        return requests.check_parameters(parameters, self.driver.name, self.driver.mutable_properties)

    def check_mutable_parameters(self, parameters: Mapping[str, str]) -> dict[str, str]:
        return requests.check_mutable_parameters(parameters, self.driver.name, self.driver.mutable_properties)

    def check_capabilities(self, capabilities: Sequence[csi_pb2.VolumeCapability]) -> bool:
        """Validate every capability; return whether they ask for block access (all or none)."""
        return requests.check_capabilities(capabilities, self.driver.name, self.driver.supports_block)

    def mount_request(self, capability: csi_pb2.VolumeCapability) -> MountRequest:
        """Validate one capability (access type, single-node mode, bind-able flags)."""
        return requests.mount_request(capability, self.driver.name, self.driver.supports_block)

    def close(self) -> None:
        self.ready.clear()
        self.digests.close()
        self.store.close()


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp of a record's time (seconds since the epoch)."""
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class PluginService:
    """What every CSI service of the plugin shares: the plugin context, its driver (the contract
    only) and store, and the CSI ID of a layer of this node."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.driver: Driver = plugin.driver
        self.store = plugin.store

    def _vid(self, layer: str) -> str:
        return make_id(layer, self.plugin.node_id)
