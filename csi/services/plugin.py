"""What every CSI service shares: configuration, the layered driver, the state store,
the per-key locks, and the checks on capabilities, topology and parameters.

:class:`Plugin` is built once per server from a :class:`PluginConfig`; building it
selects the driver (:func:`csi.graphdriver.registry.new_driver`), opens
``<root>/state.db`` and runs start-up recovery (:mod:`csi.services.recovery`).

Access types: mount access everywhere; block access (volumeMode Block) only where the
layered driver ``supports_block`` (devicemapper: the volume's thin device is the block
device), else INVALID_ARGUMENT naming the driver. One request asks for one access type.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from csi.errors import InvalidArgument, ResourceExhausted
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.registry import Selection, new_driver
from csi.proto import csi_pb2
from csi.services.locks import KeyLocks
from csi.services.volume_ids import check_node_id
from csi.state.store import StateStore

log = logging.getLogger("strata.plugin")

DEFAULT_DRIVER_NAME = "strata.csi.dev"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
KUBERNETES_PREFIX = "csi.storage.k8s.io/"
PARAM_LAYERED_DRIVER = "layeredDriver"
KNOWN_PARAMETERS = (PARAM_LAYERED_DRIVER,)
# flags a bind mount can honour (others are refused with their names)
BIND_FLAGS = frozenset({"ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
                        "defaults"})

_AccessMode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE_MODES = frozenset({_AccessMode.SINGLE_NODE_WRITER, _AccessMode.SINGLE_NODE_READER_ONLY,
                               _AccessMode.SINGLE_NODE_SINGLE_WRITER, _AccessMode.SINGLE_NODE_MULTI_WRITER})
READ_ONLY_MODES = frozenset({_AccessMode.SINGLE_NODE_READER_ONLY, _AccessMode.MULTI_NODE_READER_ONLY})


@dataclass(frozen=True)
class PluginConfig:
    root: Path
    node_id: str
    driver: str = "auto"
    driver_name: str = DEFAULT_DRIVER_NAME
    driver_options: Mapping[str, str] = field(default_factory=dict)
    max_volumes_per_node: int = 0


@dataclass(frozen=True)
class MountRequest:
    """What a VolumeCapability asks of a mount, validated. ``block``: block access (a device
    node at the target), which has no flags, group or label."""

    readonly: bool
    flags: tuple[str, ...]
    mount_group: str
    selinux_label: str
    block: bool = False


class Plugin:
    def __init__(self, config: PluginConfig) -> None:
        check_node_id(config.node_id)
        self.config = config
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.selection: Selection = new_driver(self.root, None if config.driver == "auto" else config.driver,
                                               config.driver_options)
        self.driver: LayerDriver = self.selection.driver
        self.store = StateStore(self.root)
        self.locks = KeyLocks()
        self.ready = threading.Event()
        from csi.services.recovery import recover

        recover(self)
        self.ready.set()
        log.info("plugin ready: node %s, driver %s (%s)", config.node_id, self.driver.name, self.selection.reason)

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
        unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS and not k.startswith(KUBERNETES_PREFIX))
        if unknown:
            raise InvalidArgument(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(KNOWN_PARAMETERS)} "
                                  f"and {KUBERNETES_PREFIX}*")
        wanted = parameters.get(PARAM_LAYERED_DRIVER)
        if wanted is not None and wanted != self.driver.name:
            raise InvalidArgument(f"parameter {PARAM_LAYERED_DRIVER}={wanted!r} but this node runs the "
                                  f"{self.driver.name!r} layered driver")
        return {k: v for k, v in parameters.items() if not k.startswith(KUBERNETES_PREFIX)}

    def check_capabilities(self, capabilities: Sequence[csi_pb2.VolumeCapability]) -> bool:
        """Validate every capability; return whether they ask for block access (all or none)."""
        if not capabilities:
            raise InvalidArgument("volume_capabilities is required")
        kinds = {self.mount_request(capability).block for capability in capabilities}
        if len(kinds) > 1:
            raise InvalidArgument("volume_capabilities mix block and mount access: a volume is either a block "
                                  "device or a filesystem")
        return kinds.pop()

    def mount_request(self, capability: csi_pb2.VolumeCapability) -> MountRequest:
        """Validate one capability (access type, single-node mode, bind-able flags)."""
        kind = capability.WhichOneof("access_type")
        if kind == "block" and not self.driver.supports_block:
            raise InvalidArgument(f"block access is not supported by the {self.driver.name} layered driver (a "
                                  "block volume needs a device per volume: devicemapper); use mount access")
        if kind not in ("mount", "block"):
            raise InvalidArgument("volume capability needs an access_type (mount or block)")
        mode = capability.access_mode.mode
        if mode == _AccessMode.UNKNOWN:
            raise InvalidArgument("volume capability needs an access_mode")
        if mode not in SINGLE_NODE_MODES:
            raise InvalidArgument(f"access mode {_AccessMode.Mode.Name(mode)} is not supported: strata volumes are "
                                  "node-local")
        if kind == "block":
            return MountRequest(readonly=mode in READ_ONLY_MODES, flags=(), mount_group="", selinux_label="",
                                block=True)
        mount = capability.mount
        if mount.fs_type not in ("",):
            raise InvalidArgument(f"fs_type {mount.fs_type!r} is not supported: strata volumes are directories of "
                                  "the node's layered store; leave fs_type empty")
        flags: list[str] = []
        label = ""
        for flag in mount.mount_flags:
            if flag.startswith("context="):
                label = flag[len("context="):].strip('"')
            elif flag in BIND_FLAGS:
                flags.append(flag)
            else:
                raise InvalidArgument(f"mount flag {flag!r} is not supported for a bind mount; allowed: "
                                      f"{', '.join(sorted(BIND_FLAGS))}, context=...")
        group = mount.volume_mount_group
        if group and not group.isdigit():
            raise InvalidArgument(f"volume_mount_group {group!r} must be a numeric group id")
        readonly = "ro" in flags or mode in READ_ONLY_MODES
        return MountRequest(readonly=readonly, flags=tuple(f for f in flags if f not in ("ro", "rw")),
                            mount_group=group, selinux_label=label)

    def close(self) -> None:
        self.ready.clear()
        self.store.close()
