"""Pure validation of CSI requests: what a field must hold, checked before anything is done.

Contract: functions here read only their arguments (a request field, the name of the
node's layered driver and whether it ``supports_block``) — no driver, store, mount or
gRPC context — and raise :class:`csi.errors.InvalidArgument` / :class:`~csi.errors.OutOfRange`
with a message that says what to fix; :class:`~csi.errors.ResourceExhausted` for a
topology that excludes the node. Every service validates through them, so one request
shape is judged the same everywhere.

* :func:`require`, :func:`check_path` — required fields, absolute normalised paths.
* :func:`requested_size`, :func:`fits` — capacity ranges.
* :func:`check_parameters` — StorageClass parameters (``layeredDriver`` and
  ``csi.storage.k8s.io/*``), :func:`check_snapshot_parameters` — snapshot class ones.
* :func:`mount_request`, :func:`check_capabilities` — VolumeCapability -> :class:`MountRequest`:
  mount access everywhere; block access (volumeMode Block) only where the layered driver
  ``supports_block`` (devicemapper: the volume's thin device is the block device), else
  INVALID_ARGUMENT naming the driver. One request asks for one access type; only
  single-node access modes (strata volumes are node-local); only bind-able mount flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from csi.errors import InvalidArgument, OutOfRange
from csi.proto import csi_pb2

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
class MountRequest:
    """What a VolumeCapability asks of a mount, validated. ``block``: block access (a device
    node at the target), which has no flags, group or label."""

    readonly: bool
    flags: tuple[str, ...]
    mount_group: str
    selinux_label: str
    block: bool = False


def require(value: object, what: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} is required")


def check_path(value: str, what: str) -> str:
    """An absolute, normalised path without NUL; InvalidArgument otherwise."""
    require(value, what)
    if "\0" in value or not value.startswith("/") or os.path.normpath(value) != value.rstrip("/") or value == "/":
        raise InvalidArgument(f"{what} {value[:200]!r} must be an absolute, normalised path (no '..', no '//')")
    return value.rstrip("/")


def requested_size(capacity: csi_pb2.CapacityRange, total_bytes: int) -> int:
    """The size to give a volume for a capacity range (0: no range, no limit)."""
    required, limit = capacity.required_bytes, capacity.limit_bytes
    if required < 0 or limit < 0:
        raise OutOfRange(f"capacity range must not be negative (required {required}, limit {limit})")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} exceeds limit_bytes {limit}")
    size = required or limit
    if size > total_bytes:
        raise OutOfRange(f"{size} bytes requested but the backing store holds only {total_bytes} bytes")
    return size


def fits(capacity: int, range_: csi_pb2.CapacityRange) -> bool:
    return capacity >= range_.required_bytes and (not range_.limit_bytes or capacity <= range_.limit_bytes)


def check_parameters(parameters: Mapping[str, str], driver_name: str) -> dict[str, str]:
    """The StorageClass parameters strata keeps (``csi.storage.k8s.io/*`` dropped)."""
    unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS and not k.startswith(KUBERNETES_PREFIX))
    if unknown:
        raise InvalidArgument(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(KNOWN_PARAMETERS)} "
                              f"and {KUBERNETES_PREFIX}*")
    wanted = parameters.get(PARAM_LAYERED_DRIVER)
    if wanted is not None and wanted != driver_name:
        raise InvalidArgument(f"parameter {PARAM_LAYERED_DRIVER}={wanted!r} but this node runs the "
                              f"{driver_name!r} layered driver")
    return {k: v for k, v in parameters.items() if not k.startswith(KUBERNETES_PREFIX)}


def check_snapshot_parameters(parameters: Mapping[str, str]) -> None:
    unknown = sorted(k for k in parameters if not k.startswith(KUBERNETES_PREFIX))
    if unknown:
        raise InvalidArgument(f"unknown snapshot parameter(s) {', '.join(unknown)}; only "
                              f"{KUBERNETES_PREFIX}* keys are accepted")


def mount_request(capability: csi_pb2.VolumeCapability, driver_name: str, supports_block: bool) -> MountRequest:
    """Validate one capability (access type, single-node mode, bind-able flags)."""
    kind = capability.WhichOneof("access_type")
    if kind == "block" and not supports_block:
        raise InvalidArgument(f"block access is not supported by the {driver_name} layered driver (a "
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


def check_capabilities(capabilities: Sequence[csi_pb2.VolumeCapability], driver_name: str,
                       supports_block: bool) -> bool:
    """Validate every capability; return whether they ask for block access (all or none)."""
    if not capabilities:
        raise InvalidArgument("volume_capabilities is required")
    kinds = {mount_request(capability, driver_name, supports_block).block for capability in capabilities}
    if len(kinds) > 1:
        raise InvalidArgument("volume_capabilities mix block and mount access: a volume is either a block "
                              "device or a filesystem")
    return kinds.pop()
