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
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from csi.errors import ResourceExhausted
from csi.graphdriver.driver import Driver
from csi.graphdriver.registry import Selection, new_driver
from csi.proto import csi_pb2
from csi.services import requests
from csi.services.listen import DEFAULT_DRIVER_NAME
from csi.services.locks import KeyLocks
from csi.services.requests import MountRequest
from csi.services.volume_ids import check_node_id
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


class Plugin:
    def __init__(self, config: PluginConfig) -> None:
        check_node_id(config.node_id)
        self.config = config
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.selection: Selection = new_driver(self.root, None if config.driver == "auto" else config.driver,
                                               config.driver_options)
        self.driver: Driver = self.selection.driver
        self.store = StateStore(self.root)
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
        self.store.close()
