"""Pure validation of CSI requests: what a field must hold, checked before anything is done.

Contract: functions here read only their arguments (a request field, the name of the
node's layered driver and whether it ``supports_block``) — no driver, store, mount or
gRPC context — and raise :class:`csi.errors.InvalidArgument` / :class:`~csi.errors.OutOfRange`
with a message that says what to fix; :class:`~csi.errors.ResourceExhausted` for a
topology that excludes the node. Every service validates through them, so one request
shape is judged the same everywhere.

* :func:`require`, :func:`check_path` — required fields, absolute normalised paths.
* :func:`requested_size`, :func:`fits` — capacity ranges.
* :func:`check_parameters` — StorageClass parameters (``layeredDriver``, ``compression``,
  ``backupTarget`` and ``csi.storage.k8s.io/*``), :func:`check_snapshot_parameters` —
  VolumeSnapshotClass ones (``backupTarget``, ``backupCompression`` where a backup may be
  made: :class:`BackupRequest`).
* :func:`is_backup_reference` / :func:`docker_config_of` — a snapshot handle that names an
  OCI backup, and the registry credentials in a request's ``secrets``
  (``.dockerconfigjson``, as a ``kubernetes.io/dockerconfigjson`` Secret holds them).
* :func:`mount_request`, :func:`check_capabilities` — VolumeCapability -> :class:`MountRequest`:
  mount access everywhere; block access (volumeMode Block) only where the layered driver
  ``supports_block`` (devicemapper: the volume's thin device is the block device), else
  INVALID_ARGUMENT naming the driver. One request asks for one access type; only
  single-node access modes (strata volumes are node-local); only bind-able mount flags.
* :func:`check_sharing` — a publication against the ones that already hold the volume
  (the access modes' sharing rules; FAILED_PRECONDITION when they exclude it).
* :func:`issue_token` / :func:`read_token` — opaque paging tokens for ListVolumes and
  ListSnapshots: the position and the list it belongs to, signed with the plugin's key
  (HMAC-SHA256); anything else — a layer ID, another list's token, a forged or altered
  one, one from before a restart — is ABORTED, as the spec's Errors table asks.

Order of checks, the same in every RPC (the spec's Errors tables give the code for the
first condition that fails): **required fields** (INVALID_ARGUMENT) -> **the object
exists** (NOT_FOUND; an ID strata did not issue is a missing object) -> **its state**
(e.g. not staged/published at that path: NOT_FOUND / FAILED_PRECONDITION) -> **the finer
shape of the other arguments** (path form, capability, parameters, capacity). A required
path is "present" when non-empty; its form is judged in the last step.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from csi.backup.auth import DockerConfig, parse_docker_config
from csi.backup.reference import LAYOUT_SCHEME, REGISTRY_SCHEME, parse_reference
from csi.errors import Aborted, FailedPrecondition, InvalidArgument, OutOfRange
from csi.proto import csi_pb2

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
KUBERNETES_PREFIX = "csi.storage.k8s.io/"
PARAM_LAYERED_DRIVER = "layeredDriver"
# parameters a driver may be able to change on a live volume (Driver.mutable_properties):
# StorageClass parameters at CreateVolume, VolumeAttributesClass ones at Create/ModifyVolume
MUTABLE_PARAMETERS = ("compression",)
# where snapshots are backed up (a VolumeSnapshotClass parameter); on a StorageClass, where a
# restore looks for a snapshot's backup when its owner node cannot be reached
PARAM_BACKUP_TARGET = "backupTarget"
PARAM_BACKUP_COMPRESSION = "backupCompression"
BACKUP_COMPRESSIONS = ("none", "zstd")
DOCKER_CONFIG_KEY = ".dockerconfigjson"
KNOWN_PARAMETERS = (PARAM_LAYERED_DRIVER, *MUTABLE_PARAMETERS, PARAM_BACKUP_TARGET)
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
    mode: int = 0  # the access mode asked for (csi.v1 VolumeCapability.AccessMode.Mode)


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


def check_mutable_parameters(parameters: Mapping[str, str], driver_name: str,
                             driver_mutable: frozenset[str]) -> dict[str, str]:
    """Mutable parameters (VolumeAttributesClass): known keys the node's driver can change;
    INVALID_ARGUMENT naming the driver for the ones it cannot (the spec's "infeasible")."""
    unknown = sorted(k for k in parameters if k not in MUTABLE_PARAMETERS)
    if unknown:
        raise InvalidArgument(f"unknown mutable parameter(s) {', '.join(unknown)}; known: "
                              f"{', '.join(MUTABLE_PARAMETERS)}")
    cannot = sorted(k for k in parameters if k not in driver_mutable)
    if cannot:
        raise InvalidArgument(f"the {driver_name} layered driver cannot change {', '.join(cannot)} of a volume "
                              f"(it can change: {', '.join(sorted(driver_mutable)) or 'nothing'})")
    return dict(parameters)


def check_parameters(parameters: Mapping[str, str], driver_name: str,
                     driver_mutable: frozenset[str] = frozenset()) -> dict[str, str]:
    """The StorageClass parameters strata keeps (``csi.storage.k8s.io/*`` dropped)."""
    unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS and not k.startswith(KUBERNETES_PREFIX))
    if unknown:
        raise InvalidArgument(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(KNOWN_PARAMETERS)} "
                              f"and {KUBERNETES_PREFIX}*")
    wanted = parameters.get(PARAM_LAYERED_DRIVER)
    if wanted is not None and wanted != driver_name:
        raise InvalidArgument(f"parameter {PARAM_LAYERED_DRIVER}={wanted!r} but this node runs the "
                              f"{driver_name!r} layered driver")
    check_mutable_parameters({k: v for k, v in parameters.items() if k in MUTABLE_PARAMETERS}, driver_name,
                             driver_mutable)
    if PARAM_BACKUP_TARGET in parameters:
        check_backup_target(parameters[PARAM_BACKUP_TARGET])
    return {k: v for k, v in parameters.items() if not k.startswith(KUBERNETES_PREFIX)}


@dataclass(frozen=True)
class BackupRequest:
    """A VolumeSnapshotClass's backup parameters: ``target`` "" for no backup."""

    target: str = ""
    compression: str = "none"


def check_backup_target(value: str) -> str:
    """A backup target: ``oci://host[:port]/repository`` or ``oci-layout:/dir`` (no tag, no digest)."""
    if not value.startswith((REGISTRY_SCHEME, LAYOUT_SCHEME)):
        raise InvalidArgument(f"parameter {PARAM_BACKUP_TARGET}={value[:120]!r} must be {REGISTRY_SCHEME}HOST/REPOSITORY "
                              f"or {LAYOUT_SCHEME}/DIRECTORY")
    try:
        ref = parse_reference(f"{value}:probe")
    except InvalidArgument as exc:
        raise InvalidArgument(f"parameter {PARAM_BACKUP_TARGET}: {exc}") from None
    if ref.tag != "probe" or ref.digest is not None:
        raise InvalidArgument(f"parameter {PARAM_BACKUP_TARGET}={value[:120]!r} names a tag or digest: give the "
                              "repository only (each snapshot is tagged with its own ID)")
    return value


def check_snapshot_parameters(parameters: Mapping[str, str], allow_backup: bool = False) -> BackupRequest:
    """VolumeSnapshotClass parameters; the backup keys only where a backup can be made
    (``allow_backup``: CreateSnapshot, not group snapshots)."""
    known = (PARAM_BACKUP_TARGET, PARAM_BACKUP_COMPRESSION) if allow_backup else ()
    unknown = sorted(k for k in parameters if k not in known and not k.startswith(KUBERNETES_PREFIX))
    if unknown:
        accepted = f"{', '.join(known)} and " if known else "only "
        raise InvalidArgument(f"unknown snapshot parameter(s) {', '.join(unknown)}; {accepted}"
                              f"{KUBERNETES_PREFIX}* keys are accepted")
    target = parameters.get(PARAM_BACKUP_TARGET, "")
    compression = parameters.get(PARAM_BACKUP_COMPRESSION, "none")
    if compression not in BACKUP_COMPRESSIONS:
        raise InvalidArgument(f"parameter {PARAM_BACKUP_COMPRESSION}={compression[:40]!r} is not one of "
                              f"{', '.join(BACKUP_COMPRESSIONS)}")
    if PARAM_BACKUP_COMPRESSION in parameters and not target:
        raise InvalidArgument(f"parameter {PARAM_BACKUP_COMPRESSION} needs {PARAM_BACKUP_TARGET}")
    return BackupRequest(check_backup_target(target) if target else "", compression)


def is_backup_reference(value: str) -> bool:
    """Whether a snapshot handle names an OCI backup rather than a strata snapshot."""
    return value.startswith((REGISTRY_SCHEME, LAYOUT_SCHEME))


def docker_config_of(secrets: Mapping[str, str]) -> DockerConfig | None:
    """Registry credentials from a request's ``secrets`` (never logged: the CSI fields are
    ``csi_secret`` and :class:`~csi.backup.auth.Credentials` hides its values)."""
    raw = secrets.get(DOCKER_CONFIG_KEY)
    if raw is None:
        return None
    try:
        return parse_docker_config(raw)
    except InvalidArgument as exc:
        raise InvalidArgument(f"secret key {DOCKER_CONFIG_KEY}: {exc}") from None


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
                            block=True, mode=mode)
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
                        mount_group=group, selinux_label=label, mode=mode)


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


def _mode_name(mode: int) -> str:
    return _AccessMode.Mode.Name(mode) if mode in _AccessMode.Mode.values() else str(mode)


def check_sharing(holders: Sequence[tuple[int, bool, str]], mode: int, readonly: bool, volume_id: str) -> None:
    """Whether a new publication ``(mode, readonly)`` may join ``holders`` — the volume's
    other publications on this node as ``(mode, readonly, path)``. The access modes (csi.proto):

    * SINGLE_NODE_SINGLE_WRITER: "published once as read/write on a single node" and, as
      Kubernetes' ReadWriteOncePod, one workload: no other publication alongside it.
    * SINGLE_NODE_WRITER: at most one read/write publication at a time.
    * SINGLE_NODE_MULTI_WRITER and SINGLE_NODE_READER_ONLY: shared (reader-only ones are
      read-only). A row from before modes were kept (0) counts as SINGLE_NODE_WRITER.
    """
    for held_mode, held_ro, path in holders:
        held_mode = held_mode or _AccessMode.SINGLE_NODE_WRITER
        if _AccessMode.SINGLE_NODE_SINGLE_WRITER in (held_mode, mode):
            clash = True
        elif _AccessMode.SINGLE_NODE_WRITER in (held_mode, mode):
            clash = not held_ro and not readonly
        else:
            clash = False
        if clash:
            raise FailedPrecondition(
                f"volume {volume_id} is already published at {path} ({_mode_name(held_mode)}"
                f"{', read-only' if held_ro else ''}); access mode {_mode_name(mode)}"
                f"{' read-only' if readonly else ''} does not allow another publication alongside it")


_TOKEN_VERSION = "1"
_TOKEN_MAC_BYTES = 16


def issue_token(key: bytes, kind: str, position: str) -> str:
    """An opaque token for the entry after ``position`` of list ``kind``."""
    body = f"{_TOKEN_VERSION}:{kind}:{position}".encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()[:_TOKEN_MAC_BYTES]
    return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")


def read_token(key: bytes, kind: str, token: str) -> str:
    """The position in ``token``, if strata issued it for list ``kind``; ABORTED otherwise."""
    shown = token[:80]
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        raw = b""
    mac, body = raw[:_TOKEN_MAC_BYTES], raw[_TOKEN_MAC_BYTES:]
    good = hmac.new(key, body, hashlib.sha256).digest()[:_TOKEN_MAC_BYTES]
    parts = body.decode("utf-8", "replace").split(":", 2)
    if len(token) > 512 or len(mac) != _TOKEN_MAC_BYTES or not hmac.compare_digest(mac, good) \
            or len(parts) != 3 or parts[0] != _TOKEN_VERSION or parts[1] != kind:
        raise Aborted(f"starting_token {shown!r} was not issued by this plugin for {kind} (or the plugin "
                      "restarted since): list again from the start")
    return parts[2]
