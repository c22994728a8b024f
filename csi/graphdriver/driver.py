"""The layered-storage contract: its values and the :class:`Driver` interface (Docker's
graphdriver, kept recognisable; containerd's ``snapshotter.go`` for the split of types and interface).

Contract (:class:`Driver`)::

    create(id, parent=None, opts) -> Layer   new *writable* layer; content = parent's
    freeze(id, frozen_id) -> Layer            new *frozen* (read-only) layer holding id's
                                              current content; id stays writable, unchanged
    clone(src, id, base_id, opts) -> Layer    new writable layer with src's current content
    remove(id)                                idempotent; deferred while children exist
    get(id, mount_label="") -> Path           refcounted; frozen layers give a read-only view
    get_block(id) -> Path                     refcounted like get, for block layers: activates
                                              the layer's device and returns its node
    block_device(id) -> Path                  the device node of an active layer (no reference)
    put(id)                                   idempotent; releases get and get_block alike
    view(id) -> context manager of Path       get/put for a with block, held in memory only
    exists(id) -> bool
    status() -> [(key, value)]
    cleanup()                                 release mounts, finish deferred work, drop leftovers
    resize(id, size_bytes)                    raise a writable layer's size limit
    modify(id, properties)                    change mutable properties of a writable layer
                                              (keys in ``mutable_properties``; e.g. btrfs
                                              ``compression``); Unsupported naming the
                                              driver for anything else
    diff(id, parent) -> tar stream            OCI layer tar of id relative to parent
    changes(id, parent) -> [Change]
    apply_diff(id, parent, stream) -> int     apply an OCI layer tar onto writable id;
                                              what it wrote is on disk when it returns
    diff_size(id, parent) -> int              bytes of diff(id, parent)'s tar

Rules: only frozen layers are parents; IDs pass :func:`csi.ids.check_layer_id` before
anything else; every error is a :mod:`csi.errors` type.

Block layers (CSI volumeMode Block): a driver whose layers are devices sets
``supports_block``; ``create(..., CreateOpts(block=True))`` then makes a *raw* layer (no
filesystem), which ``get_block`` activates and ``get`` refuses (there is nothing to mount),
while ``get_block`` refuses filesystem layers. Frozen copies and children of a block layer
are block layers (a child must ask for ``block=True``; a mismatch is InvalidArgument).
Elsewhere ``block=True``, ``get_block`` and ``block_device`` raise Unsupported.

Block metadata (changed-block tracking; CSI SnapshotMetadata), where the driver sets
``supports_block_metadata``::

    allocated_blocks(id) -> BlockMap          the blocks of block layer id that hold data
    changed_blocks(base_id, id) -> BlockMap   the blocks whose content differs between base_id
                                              and id (written, overwritten or discarded since)

Both answer from the storage's own bookkeeping (a thin pool's mappings), never by reading
the data. ``changed_blocks`` raises FailedPrecondition when the two layers cannot be
compared (unrelated content, not block layers, a base larger than the layer); elsewhere
both raise Unsupported naming the driver.

This module holds types only: no storage, no I/O. The shared machinery is
:mod:`csi.graphdriver.layered`; records are :mod:`csi.graphdriver.metastore`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import IO, Any, ClassVar

from csi.errors import Unsupported

__all__ = [
    "BlockMap", "Capacity", "Change", "ChangeKind", "CreateOpts", "Driver", "Layer", "LayerKind", "LayerState",
    "Reconciliation",
]


class LayerKind(str, Enum):
    WRITABLE = "writable"  # a volume: read-write, never a parent
    FROZEN = "frozen"  # a snapshot: read-only, may be a parent


class LayerState(str, Enum):
    CREATING = "creating"
    READY = "ready"
    REMOVING = "removing"


@dataclass(frozen=True)
class Layer:
    """One layer's record."""

    id: str
    parent: str | None
    kind: LayerKind
    size_bytes: int | None = None
    state: LayerState = LayerState.CREATING
    hidden: bool = False
    mounts: int = 0
    origin: str | None = None
    created: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def frozen(self) -> bool:
        return self.kind is LayerKind.FROZEN

    @property
    def block(self) -> bool:
        """A raw block layer (``CreateOpts(block=True)``): a device, no filesystem."""
        return bool(self.extra.get("block"))

    def with_(self, **changes: Any) -> Layer:
        return replace(self, **changes)


@dataclass(frozen=True)
class CreateOpts:
    """Options of :meth:`Driver.create`. ``size_bytes`` None means no limit; ``block`` asks
    for a raw block layer (only where the driver ``supports_block``)."""

    size_bytes: int | None = None
    mount_label: str = ""
    storage_opt: Mapping[str, str] | None = None
    block: bool = False
    properties: Mapping[str, str] | None = None  # mutable properties to start with (``Driver.modify``)


class ChangeKind(str, Enum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


@dataclass(frozen=True)
class Change:
    path: str  # absolute, within the layer ("/a/b")
    kind: ChangeKind


@dataclass(frozen=True)
class Capacity:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class BlockMap:
    """Where a block layer's data is (:meth:`Driver.allocated_blocks`) or differs from a
    base (:meth:`Driver.changed_blocks`), in whole blocks of the storage.

    ``extents``: ascending, non-overlapping, non-adjacent ``(offset, length)`` in bytes,
    each a multiple of ``block_size`` and within ``capacity_bytes`` (the layer's size)."""

    block_size: int
    capacity_bytes: int
    extents: tuple[tuple[int, int], ...] = ()

    @property
    def mapped_bytes(self) -> int:
        return sum(length for _, length in self.extents)


@dataclass(frozen=True)
class Reconciliation:
    """What a start-up sweep (:meth:`Driver.reconcile`) did, or would do with ``dry_run``.

    ``interrupted``: layers whose creation or freeze a crash cut short (finished or rolled
    back); ``removals``: removals finished; ``orphans``: on-disk layers no record knows
    (deleted); ``hidden_freed``: hidden layers whose last child is gone (freed, and their
    hidden ancestors after them); ``remounted`` / ``released``: mounts brought back in line
    with the persisted reference counts."""

    interrupted: tuple[str, ...] = ()
    removals: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()
    hidden_freed: tuple[str, ...] = ()
    remounted: tuple[str, ...] = ()
    released: tuple[str, ...] = ()
    dry_run: bool = False

    @property
    def clean(self) -> bool:
        return not (self.interrupted or self.removals or self.orphans or self.hidden_freed
                    or self.remounted or self.released)


class Driver(ABC):
    """The public contract. See the module docstring."""

    name: ClassVar[str]
    supports_block: ClassVar[bool] = False  # layers are devices: CreateOpts(block=True) works
    recovered: Reconciliation | None = None  # what the start-up sweep of this instance did
    mutable_properties: ClassVar[frozenset[str]] = frozenset()  # keys ``modify`` can change
    # ``freeze`` of a mounted layer snapshots *beneath* its filesystem (a device snapshot, as
    # devicemapper's thin snapshot): the layer's own filesystem may be frozen (FIFREEZE)
    # around it. False where ``freeze`` works in the filesystem itself (a btrfs snapshot, a
    # copy), which a frozen filesystem would block.
    snapshot_below_filesystem: ClassVar[bool] = False
    # allocated_blocks / changed_blocks answer from the storage's own block bookkeeping
    supports_block_metadata: bool = False

    def allocated_blocks(self, layer_id: str) -> BlockMap:
        """The blocks of block layer ``layer_id`` that hold data (see the module docstring).
        The default: Unsupported, naming the driver."""
        raise Unsupported(f"the {self.name} layered driver keeps no block map: changed-block tracking "
                          "needs devicemapper block volumes")

    def changed_blocks(self, base_id: str, layer_id: str) -> BlockMap:
        """The blocks whose content differs between ``base_id`` and ``layer_id``. The
        default: Unsupported, naming the driver."""
        raise Unsupported(f"the {self.name} layered driver keeps no block map: changed-block tracking "
                          "needs devicemapper block volumes")

    def modify(self, layer_id: str, properties: Mapping[str, str]) -> None:
        """Change mutable properties of a writable layer (new writes follow them). The
        default: nothing is mutable, Unsupported naming the driver."""
        raise Unsupported(f"the {self.name} layered driver cannot change {', '.join(sorted(properties))} "
                          "of a volume")

    @abstractmethod
    def create(self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None) -> Layer: ...

    @abstractmethod
    def freeze(self, layer_id: str, frozen_id: str) -> Layer: ...

    @abstractmethod
    def clone(self, source_id: str, layer_id: str, base_id: str, opts: CreateOpts | None = None) -> Layer:
        """A new writable layer ``layer_id`` holding writable ``source_id``'s current content (a
        CSI clone). Layered drivers freeze the source into ``base_id`` and create the clone on it
        (``base_id`` is hidden at once and freed with the clone: the returned layer's parent);
        a driver whose child is a copy anyway copies once and makes no base (parent None)."""

    @abstractmethod
    def remove(self, layer_id: str) -> None: ...

    @abstractmethod
    def get(self, layer_id: str, mount_label: str = "") -> Path: ...

    @abstractmethod
    def get_block(self, layer_id: str) -> Path: ...

    @abstractmethod
    def block_device(self, layer_id: str) -> Path: ...

    @abstractmethod
    def put(self, layer_id: str) -> None: ...

    @abstractmethod
    def view(self, layer_id: str) -> AbstractContextManager[Path]:
        """The path of a filesystem layer for the ``with`` block (a diff stream, an apply): like
        ``get``/``put`` (frozen layers read-only) but held in this process only, never recorded,
        so a process killed meanwhile leaves no reference behind; ``remove`` is Busy meanwhile."""

    @abstractmethod
    def exists(self, layer_id: str) -> bool: ...

    @abstractmethod
    def layer(self, layer_id: str) -> Layer: ...

    @abstractmethod
    def layers(self) -> list[Layer]: ...

    @abstractmethod
    def status(self) -> list[tuple[str, str]]: ...

    @abstractmethod
    def healthy(self) -> bool:
        """Whether the driver's home is still there and usable (Identity's Probe)."""

    @abstractmethod
    def usage(self, layer_id: str) -> int | None:
        """Bytes the layer itself occupies, or None where that is not cheaply known."""

    @abstractmethod
    def references(self, layer_id: str) -> int:
        """The persisted ``get``/``get_block`` reference count of a layer, hidden or not
        (0 for a layer that does not exist)."""

    @abstractmethod
    def set_references(self, layer_id: str, count: int) -> None:
        """Bring a layer's reference count to ``count`` after a restart, activating it
        (mount, device) when it becomes positive and releasing it when it reaches 0; the
        owner of the references (the CSI records) knows how many are really held."""

    @abstractmethod
    def release(self, layer_id: str) -> None:
        """Drop every reference of a layer and remove it (deferred while it has children);
        nothing happens for a layer that does not exist. For roll-backs after a crash."""

    @abstractmethod
    def cleanup(self) -> None:
        """Release every mount, finish deferred removals, drop on-disk leftovers. Like Docker's
        ``Cleanup`` it is for shutdown (and tests): it must not run concurrently with other calls
        on the same driver, since it rolls back layers that are still being created."""

    @abstractmethod
    def resize(self, layer_id: str, size_bytes: int) -> None: ...

    @abstractmethod
    def capacity(self) -> Capacity: ...

    @abstractmethod
    def chain(self, layer_id: str) -> list[Layer]:
        """The layer and its ancestors, nearest first, hidden ancestors included."""

    @abstractmethod
    def reconcile(self, dry_run: bool = False) -> Reconciliation:
        """Bring records and disk back in line after a crash (every start runs it); with
        ``dry_run``, only report what it would do."""

    @classmethod
    @abstractmethod
    def read_layers(cls, home: Path) -> list[Layer]:
        """Every record under ``home`` (hidden and unfinished ones included), read-only: for
        operator tools that look at a node whether or not the plugin runs."""

    @classmethod
    @abstractmethod
    def holds_state(cls, home: Path) -> bool:
        """Whether ``home`` holds layers of this driver (the registry's "prior state" rule);
        reads only, and works while another process runs the driver."""

    @abstractmethod
    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]: ...

    @abstractmethod
    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]: ...

    @abstractmethod
    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes]) -> int: ...

    @abstractmethod
    def diff_size(self, layer_id: str, parent: str | None = None) -> int: ...
