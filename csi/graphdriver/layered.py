"""The machinery every driver shares: :class:`LayerDriver` implements the contract
(:class:`csi.graphdriver.driver.Driver`) once — ID checks, per-layer locks,
the crash-safe record protocol (:mod:`csi.graphdriver.metastore`), reference counts,
deferred removal, start-up reconciliation — and leaves the storage work to a few
primitives (``_make``, ``_freeze``, ``_destroy``, ``_activate``, ``_deactivate``, ...).

Crash protocol: *create* records ``creating`` first, does the disk work, then marks
``ready`` — or, in drivers that set ``record_after_make`` (their half-made layer is
found by ``_on_disk``/reconcile and removed by ``_destroy`` without a record), does the
disk work first and then writes one ``ready`` record, one database sync less per create;
*freeze* always records its intent first; *remove* marks ``removing`` (forget first),
destroys, then deletes the record.
At start-up :meth:`LayerDriver.reconcile` rolls back ``creating`` layers (or lets the
driver finish a freeze through ``_recover_freeze``), finishes ``removing`` ones, removes
on-disk entries no record knows of, frees hidden layers without children, and brings
mounts back in line with the persisted reference counts.
"""

from __future__ import annotations

import os
import threading
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, ClassVar

from csi.errors import AlreadyExists, Busy, FailedPrecondition, InvalidArgument, NotFound, StrataError, Unsupported
from csi.graphdriver.diff.naive import NaiveDiffer
from csi.graphdriver.driver import (
    BlockMap, Capacity, Change, CreateOpts, Driver, Layer, LayerKind, LayerState, Reconciliation,
)
from csi.graphdriver.metastore import LayerStore
from csi.host import mount as mnt
from csi.ids import check_layer_id

__all__ = ["LayerDriver"]


def _content(block: bool) -> str:
    return "block" if block else "filesystem"


class LayerDriver(Driver):
    """Shared machinery; subclasses implement the primitives below.

    ``home`` is the driver's own directory (``<root>/<name>``), created by ``__init__``.
    Subclasses keep their ``__init__`` signature ``(home, options)`` and raise
    NotSupported / PrerequisitesMissing / IncompatibleFilesystem from ``check_support``.
    """

    name: ClassVar[str] = "abstract"
    # create writes a single ``ready`` record after ``_make`` instead of ``creating`` before
    # it: only where ``_make`` leaves nothing a record is needed to find (``_on_disk`` lists
    # every trace of a half-made layer, ``_destroy`` removes it) and does not write the record
    record_after_make: ClassVar[bool] = False
    # clone() copies the source into a new parentless layer (``_make_copy``) instead of freezing
    # it and creating a child: for drivers whose child is a copy of its parent anyway (vfs), so a
    # clone costs one copy, not two
    clone_copies: ClassVar[bool] = False

    def __init__(self, home: str | os.PathLike[str], options: Mapping[str, str] | None = None, *,
                 recover: bool = True) -> None:
        self.home = Path(home)
        self.options: Mapping[str, str] = dict(options or {})
        self.check_support(self.home, self.options)
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self.store = LayerStore(self.home)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._views: dict[str, int] = {}  # transient views (view()): this process only, never recorded
        self._setup()
        # the start-up sweep; ``recover=False`` is for inspection (``strata gc --dry-run``)
        self.recovered = self.reconcile() if recover else None

    # ------------------------------------------------------------------ primitives

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        """Raise a DriverUnavailable subclass when this driver cannot run for ``home``."""

    def _setup(self) -> None:
        """Prepare the home (sub-directories, quota set-up). Runs before reconcile."""

    @abstractmethod
    def _make(self, layer: Layer, parent: Layer | None) -> None:
        """Create ``layer`` (writable) on disk with the content of ``parent``; enforce
        ``layer.size_bytes`` where possible. May leave partial state on failure:
        ``_destroy`` must clean it."""

    @abstractmethod
    def _freeze(self, source: Layer, frozen: Layer) -> str | None:
        """Create ``frozen`` on disk holding ``source``'s current content.

        ``frozen.parent`` is set to ``source.parent`` by the caller; a driver may instead
        record (before any disk work, holding that layer's lock) another frozen layer whose
        content plus ``frozen``'s own is ``source``'s (overlay's incremental freeze). Return the ID that
        ``source`` should have as parent afterwards (``frozen.id`` when the driver rebased
        ``source`` onto the new layer, as overlay does), or ``source.parent``.
        ``source.mounts`` tells whether it is in use."""

    def _make_copy(self, layer: Layer, source: Layer) -> None:
        """Create ``layer`` (writable, no parent) holding a copy of ``source``'s current content;
        only drivers that set ``clone_copies``."""
        raise Unsupported(f"{self.name} clones by freezing the source")

    def _recover_freeze(self, source: Layer, frozen: Layer) -> str | None | bool:
        """A freeze was interrupted by a crash. Either finish it and return the parent
        ``source`` must have (like ``_freeze``), or return False to roll it back
        (``_destroy(frozen)`` follows). Default: roll back."""
        return False

    @abstractmethod
    def _destroy(self, layer_id: str) -> None:
        """Remove everything on disk for ``layer_id``; tolerate partial or absent state."""

    @abstractmethod
    def _on_disk(self) -> set[str]:
        """IDs of the layers present on disk (to find orphans)."""

    @abstractmethod
    def _path(self, layer: Layer) -> Path:
        """Where ``get`` exposes the layer's full content: a path below the home that has the
        layer's ID as one of its components (reconcile finds stray mounts by it)."""

    def _activate(self, layer: Layer, chain: list[Layer], mount_label: str) -> None:
        """Make ``_path(layer)`` show the content (mount). ``chain`` = layer, parent, ...
        Frozen layers must be exposed read-only."""

    def _deactivate(self, layer: Layer) -> None:
        """Undo ``_activate``; tolerate an already-gone mount."""

    def _is_active(self, layer: Layer) -> bool:
        """Whether ``_activate`` is in effect (used by reconcile). Default: always."""
        return True

    def _block_path(self, layer: Layer) -> Path:
        """The device node of an active layer (drivers that set ``supports_block``)."""
        raise Unsupported(self._no_block())

    def _allocated_blocks(self, layer: Layer) -> BlockMap:
        """The data blocks of a block layer (drivers that set ``supports_block_metadata``)."""
        raise Unsupported(f"the {self.name} layered driver keeps no block map: changed-block tracking "
                          "needs devicemapper block volumes")

    def _changed_blocks(self, base: Layer, layer: Layer) -> BlockMap:
        """The blocks that differ between two related block layers (``supports_block_metadata``)."""
        raise Unsupported(f"the {self.name} layered driver keeps no block map: changed-block tracking "
                          "needs devicemapper block volumes")

    def _no_block(self) -> str:
        return (f"the {self.name} layered driver has no block device per layer: block volumes need "
                "devicemapper (a thin device per layer)")

    def _check_properties(self, properties: Mapping[str, str]) -> None:
        """Refuse keys outside ``mutable_properties`` (Unsupported, naming the driver) and
        values the driver does not know (InvalidArgument). Runs before anything is done."""
        cannot = sorted(set(properties) - self.mutable_properties)
        if cannot:
            can = ", ".join(sorted(self.mutable_properties)) or "nothing"
            raise Unsupported(f"the {self.name} layered driver cannot change {', '.join(cannot)} of a volume "
                              f"(it can change: {can})")

    def _modify(self, layer: Layer, path: Path, properties: Mapping[str, str]) -> None:
        """Apply mutable properties to the writable layer whose content is at ``path``."""
        raise Unsupported(f"the {self.name} layered driver cannot change {', '.join(sorted(properties))}")

    def _set_size(self, layer: Layer, size_bytes: int) -> None:
        """Apply a size limit to an existing writable layer. Default: unsupported."""
        raise Unsupported(f"{self.name}: {self.size_enforcement()}")

    def size_enforcement(self) -> str:
        """One line for ``status()``: how (or why not) sizes are enforced."""
        return "none"

    def _status_extra(self) -> list[tuple[str, str]]:
        return []

    def _usage(self, layer: Layer) -> int | None:
        """Bytes the layer itself occupies, if cheaply known."""
        return None

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _locked(self, *layer_ids: str) -> Iterator[None]:
        """Hold the per-layer locks of ``layer_ids`` (sorted, to avoid deadlocks)."""
        locks = []
        with self._locks_guard:
            for lid in sorted(set(i for i in layer_ids if i)):
                locks.append(self._locks.setdefault(lid, threading.RLock()))
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def _visible(self, layer_id: str, what: str = "layer") -> Layer:
        check_layer_id(layer_id, what)
        layer = self.store.get(layer_id)
        if layer is None or layer.hidden or layer.state is not LayerState.READY:
            raise NotFound(f"{what} {layer_id} does not exist")
        return layer

    def chain(self, layer_id: str) -> list[Layer]:
        """The layer and its ancestors, nearest first."""
        result: list[Layer] = []
        current: str | None = layer_id
        while current is not None:
            layer = self.store.require(current)
            result.append(layer)
            current = layer.parent
            if len(result) > 10_000:
                raise StrataError(f"parent cycle at layer {layer_id}")
        return result

    def _live_children(self, layer_id: str) -> list[Layer]:
        return [c for c in self.store.children(layer_id) if c.state is not LayerState.REMOVING]

    # ------------------------------------------------------------------ contract

    def create(self, layer_id: str, parent: str | None = None, opts: CreateOpts | None = None) -> Layer:
        return self._create(layer_id, parent, opts, None)

    def clone(self, source_id: str, layer_id: str, base_id: str, opts: CreateOpts | None = None) -> Layer:
        check_layer_id(source_id, "source layer id")
        check_layer_id(base_id, "base layer id")
        if self.clone_copies:  # one copy of the source: no frozen base (base_id unused)
            return self._create(layer_id, None, opts, source_id)
        self.freeze(source_id, base_id)
        try:
            layer = self.create(layer_id, base_id, opts)
        finally:
            self.remove(base_id)  # hidden while the clone stands on it; gone at once if the create failed
        return layer

    def _create(self, layer_id: str, parent: str | None, opts: CreateOpts | None, copy_of: str | None) -> Layer:
        check_layer_id(layer_id)
        if parent is not None:
            check_layer_id(parent, "parent layer id")
        opts = opts or CreateOpts()
        if opts.size_bytes is not None and opts.size_bytes < 0:
            raise InvalidArgument(f"size must not be negative, got {opts.size_bytes}")
        if opts.block and not self.supports_block:
            raise Unsupported(self._no_block())
        properties = dict(opts.properties or {})
        self._check_properties(properties)
        with self._locked(layer_id, parent or "", copy_of or ""):
            if self.store.get(layer_id) is not None:
                raise AlreadyExists(f"layer {layer_id} already exists")
            source = self._visible(copy_of, "source layer") if copy_of is not None else None
            if source is not None and source.block != opts.block:
                raise InvalidArgument(f"source layer {copy_of} is a {_content(source.block)} layer: its copy cannot "
                                      f"be a {_content(opts.block)} layer")
            parent_layer = None
            if parent is not None:
                parent_layer = self._visible(parent, "parent layer")
                if not parent_layer.frozen:
                    raise InvalidArgument(f"parent layer {parent} is writable: only frozen layers can be parents")
                if parent_layer.block != opts.block:
                    raise InvalidArgument(f"parent layer {parent} is a {_content(parent_layer.block)} layer: its child "
                                          f"cannot be a {_content(opts.block)} layer")
            extra: dict[str, object] = {"block": True} if opts.block else {}
            if properties:
                extra["properties"] = properties  # _make applies them
            layer = Layer(id=layer_id, parent=parent, kind=LayerKind.WRITABLE, size_bytes=opts.size_bytes,
                          extra=extra)
            if self.record_after_make:  # a kill during _make leaves an orphan that reconcile removes
                try:
                    if source is not None:
                        self._make_copy(layer, source)
                    else:
                        self._make(layer, parent_layer)
                    ready = layer.with_(state=LayerState.READY)
                    self.store.insert(ready)
                except BaseException:
                    self._rollback(layer_id)
                    raise
                return ready
            self.store.insert(layer)
            try:
                if source is not None:
                    self._make_copy(layer, source)
                else:
                    self._make(layer, parent_layer)
            except BaseException:
                self._rollback(layer_id)
                raise
            return self.store.update(layer_id, state=LayerState.READY)

    def _rollback(self, layer_id: str) -> None:
        try:
            self._destroy(layer_id)
        finally:
            self.store.delete(layer_id)

    def freeze(self, layer_id: str, frozen_id: str) -> Layer:
        check_layer_id(layer_id)
        check_layer_id(frozen_id, "frozen layer id")
        with self._locked(layer_id, frozen_id):
            source = self._visible(layer_id)
            if source.frozen:
                raise InvalidArgument(f"layer {layer_id} is already frozen")
            if self.store.get(frozen_id) is not None:
                raise AlreadyExists(f"layer {frozen_id} already exists")
            frozen = Layer(id=frozen_id, parent=source.parent, kind=LayerKind.FROZEN, origin=layer_id,
                           extra={"block": True} if source.block else {})
            self.store.insert(frozen)
            try:
                new_parent = self._freeze(source, frozen)
            except BaseException:
                stacked_on = (self.store.get(frozen_id) or frozen).parent
                self._rollback(frozen_id)
                if stacked_on != source.parent:  # _freeze put it on a layer removal may have hidden
                    self._free_if_orphaned(stacked_on)
                raise
            with self.store.transaction():
                if new_parent != source.parent:
                    self.store.update(layer_id, parent=new_parent)
                return self.store.update(frozen_id, state=LayerState.READY)

    def remove(self, layer_id: str) -> None:
        check_layer_id(layer_id)
        with self._locked(layer_id):
            layer = self.store.get(layer_id)
            if layer is None or layer.hidden:
                return
            if layer.mounts > 0 or self._views.get(layer_id):
                raise Busy(f"layer {layer_id} is in use ({layer.mounts} mount reference(s), "
                           f"{self._views.get(layer_id, 0)} open view(s))")
            if self._live_children(layer_id):
                self.store.update(layer_id, hidden=True)
                return
            self._remove_now(layer)

    def _remove_now(self, layer: Layer) -> None:
        self._remove_one(layer)
        if layer.parent is not None:
            self._free_if_orphaned(layer.parent)

    def _remove_one(self, layer: Layer) -> None:
        """Forget first (REMOVING), destroy, drop the record: a crash between is finished by reconcile."""
        self.store.update(layer.id, state=LayerState.REMOVING)
        self._destroy(layer.id)
        self.store.delete(layer.id)

    def _free_if_orphaned(self, layer_id: str | None) -> None:
        """Remove a hidden layer once its last child is gone, then its hidden parent, and so on
        up the chain (a loop, not recursion: hidden chains may be thousands deep)."""
        while layer_id is not None:
            with self._locked(layer_id):
                layer = self.store.get(layer_id)
                if layer is None or not layer.hidden or layer.mounts or self._live_children(layer_id):
                    return
                self._remove_one(layer)
            layer_id = layer.parent

    def get(self, layer_id: str, mount_label: str = "") -> Path:
        return self._path(self._acquire(layer_id, block=False, mount_label=mount_label))

    def get_block(self, layer_id: str) -> Path:
        if not self.supports_block:
            raise Unsupported(self._no_block())
        return self._block_path(self._acquire(layer_id, block=True, mount_label=""))

    def block_device(self, layer_id: str) -> Path:
        if not self.supports_block:
            raise Unsupported(self._no_block())
        layer = self._visible(layer_id)
        if layer.mounts == 0 or not self._is_active(layer):
            raise FailedPrecondition(f"layer {layer_id} is not active: get_block it first")
        return self._block_path(layer)

    def _acquire(self, layer_id: str, *, block: bool, mount_label: str) -> Layer:
        """Activate (first reference) and count one more reference; ``get`` and ``get_block``."""
        check_layer_id(layer_id)
        with self._locked(layer_id):
            layer = self._visible(layer_id)
            if layer.block != block:
                raise InvalidArgument(
                    f"layer {layer_id} is a raw block layer with no filesystem to mount: use get_block"
                    if layer.block else f"layer {layer_id} holds a filesystem, not a raw block device: use get")
            if (layer.mounts == 0 and not self._views.get(layer_id)) or not self._is_active(layer):
                self._activate(layer, self.chain(layer_id), mount_label)
            try:
                self.store.update(layer_id, mounts=layer.mounts + 1)
            except BaseException:
                if layer.mounts == 0 and not self._views.get(layer_id):
                    self._deactivate(layer)
                raise
            return layer

    def put(self, layer_id: str) -> None:
        check_layer_id(layer_id)
        with self._locked(layer_id):
            layer = self.store.get(layer_id)
            if layer is None or layer.mounts == 0:
                return
            if layer.mounts == 1 and not self._views.get(layer_id):
                self._deactivate(layer)
            self.store.update(layer_id, mounts=layer.mounts - 1)

    @contextmanager
    def view(self, layer_id: str) -> Iterator[Path]:
        check_layer_id(layer_id)
        with self._locked(layer_id):
            layer = self._visible(layer_id)
            if layer.block:
                raise InvalidArgument(f"layer {layer_id} is a raw block layer with no filesystem to read")
            if (layer.mounts == 0 and not self._views.get(layer_id)) or not self._is_active(layer):
                self._activate(layer, self.chain(layer_id), "")
            self._views[layer_id] = self._views.get(layer_id, 0) + 1
        try:
            yield self._path(layer)
        finally:
            with self._locked(layer_id):
                left = self._views[layer_id] - 1
                if left:
                    self._views[layer_id] = left
                else:
                    del self._views[layer_id]
                    current = self.store.get(layer_id)
                    if current is not None and current.mounts == 0:
                        self._deactivate(current)

    def exists(self, layer_id: str) -> bool:
        try:
            self._visible(layer_id)
        except (NotFound, InvalidArgument):
            return False
        return True

    def layer(self, layer_id: str) -> Layer:
        return self._visible(layer_id)

    def layers(self) -> list[Layer]:
        return [l for l in self.store.all() if l.state is LayerState.READY and not l.hidden]

    def resize(self, layer_id: str, size_bytes: int) -> None:
        check_layer_id(layer_id)
        if size_bytes < 0:
            raise InvalidArgument(f"size must not be negative, got {size_bytes}")
        with self._locked(layer_id):
            layer = self._visible(layer_id)
            if layer.frozen:
                raise InvalidArgument(f"layer {layer_id} is frozen: its size cannot change")
            if layer.size_bytes is not None and size_bytes < layer.size_bytes:
                raise InvalidArgument(f"cannot shrink layer {layer_id} from {layer.size_bytes} to {size_bytes} bytes")
            self._set_size(layer, size_bytes)
            self.store.update(layer_id, size_bytes=size_bytes)

    def modify(self, layer_id: str, properties: Mapping[str, str]) -> None:
        check_layer_id(layer_id)
        self._check_properties(properties)
        with self._locked(layer_id):
            layer = self._visible(layer_id)
            if layer.frozen:
                raise InvalidArgument(f"layer {layer_id} is frozen: its properties cannot change")
            self._modify(layer, self._path(layer), properties)
            merged = {**layer.extra.get("properties", {}), **properties}
            self.store.update(layer_id, extra={**layer.extra, "properties": merged})

    def capacity(self) -> Capacity:
        st = os.statvfs(self.home)
        return Capacity(total_bytes=st.f_blocks * st.f_frsize, available_bytes=st.f_bavail * st.f_frsize)

    def usage(self, layer_id: str) -> int | None:
        return self._usage(self._visible(layer_id))

    def healthy(self) -> bool:
        return self.home.is_dir()

    def references(self, layer_id: str) -> int:
        check_layer_id(layer_id)
        layer = self.store.get(layer_id)
        return layer.mounts if layer is not None else 0

    def set_references(self, layer_id: str, count: int) -> None:
        check_layer_id(layer_id)
        if count < 0:
            raise InvalidArgument(f"a reference count cannot be negative, got {count}")
        with self._locked(layer_id):
            layer = self._visible(layer_id)
            if count > 0 and (layer.mounts == 0 or not self._is_active(layer)):
                self._activate(layer, self.chain(layer_id), "")
            elif count == 0 and layer.mounts > 0:
                self._deactivate(layer)
            if count != layer.mounts:
                self.store.update(layer_id, mounts=count)

    def release(self, layer_id: str) -> None:
        check_layer_id(layer_id)
        with self._locked(layer_id):
            layer = self.store.get(layer_id)
            if layer is None:
                return
            if layer.mounts > 0:
                self._deactivate(layer)
                self.store.update(layer_id, mounts=0)
        self.remove(layer_id)

    @classmethod
    def read_layers(cls, home: Path) -> list[Layer]:
        return LayerStore.read_only(Path(home))

    @classmethod
    def holds_state(cls, home: Path) -> bool:
        home = Path(home)
        if not home.is_dir():
            return False
        records = LayerStore.has_records(home)
        return records if records is not None else any(home.iterdir())

    def status(self) -> list[tuple[str, str]]:
        all_layers = self.store.all()
        cap = self.capacity()
        return [
            ("driver", self.name),
            ("home", str(self.home)),
            ("layers", str(sum(1 for l in all_layers if not l.hidden))),
            ("frozen layers", str(sum(1 for l in all_layers if l.frozen and not l.hidden))),
            ("hidden layers (removal deferred)", str(sum(1 for l in all_layers if l.hidden))),
            ("size enforcement", self.size_enforcement()),
            ("capacity bytes", str(cap.total_bytes)),
            ("available bytes", str(cap.available_bytes)),
            *self._status_extra(),
        ]

    # ------------------------------------------------------------------ recovery

    def reconcile(self, dry_run: bool = False) -> Reconciliation:
        """Bring disk and records back in line after a crash (see module docstring) and say
        what was done; with ``dry_run`` only say what would be done (nothing is written).

        The records are read once and read again only after a step that changed them (a
        rollback, a finished removal, a freed hidden layer): at start-up with 10,000s of
        layers each full read costs ~0.1 s. Around the shared sweep a driver repairs what a
        power cut may have lost (:meth:`_repair_lost`, before) and brings its own per-layer
        state in line (:meth:`_after_sweep`), both from the same records."""
        records = self.store.all()
        if not dry_run:
            self._repair_lost(records)
        interrupted = tuple(l.id for l in records if l.state is LayerState.CREATING)
        removals = tuple(l.id for l in records if l.state is LayerState.REMOVING)
        if not dry_run and (interrupted or removals):
            for layer in records:
                if layer.state is LayerState.REMOVING:
                    self._destroy(layer.id)
                    self.store.delete(layer.id)
                elif layer.state is LayerState.CREATING:
                    self._recover_creating(layer)
            records = self.store.all()  # what recovery kept (a dry run: every record)
        orphans = tuple(sorted(self._on_disk() - {l.id for l in records}))
        live_children: set[str] = {l.parent for l in records if l.parent is not None and l.state is not LayerState.REMOVING}
        hidden = [l for l in records if l.hidden]
        freeable = tuple(l.id for l in hidden if not l.mounts and l.id not in live_children)
        ready = [l for l in records if l.state is LayerState.READY]
        remount = tuple(l.id for l in ready if l.mounts > 0 and not self._is_active(l))
        release = self._mounted_unheld(ready)
        if not dry_run:
            for orphan in orphans:
                self._destroy(orphan)
            for layer in hidden:
                self._free_if_orphaned(layer.id)
            if hidden:
                records = self.store.all()
            releasing = set(release)
            for layer in records:
                if layer.state is LayerState.READY and layer.mounts > 0 and not self._is_active(layer):
                    self._activate(layer, self.chain(layer.id), "")
                elif layer.state is LayerState.READY and layer.mounts == 0 and layer.id in releasing:
                    # a crash between _activate and the refcount update leaves a mount nobody holds
                    # (devicemapper's own reconcile also deactivates devices nothing holds)
                    self._deactivate(layer)
            self._after_sweep(records)
        return Reconciliation(interrupted=interrupted, removals=removals, orphans=orphans,
                              hidden_freed=freeable, remounted=remount, released=release, dry_run=dry_run)

    def _mounted_unheld(self, ready: list[Layer]) -> tuple[str, ...]:
        """Layers without references whose ``_path`` is a mount point, from one read of the
        mount table: only layers whose ID is a component of a mount target below the home are
        looked at (every ``_path`` names its layer's ID), and the home is resolved once (the
        paths below it are the driver's own directories, never symlinks)."""
        real_home = os.path.realpath(self.home)
        below = [mp.target for mp in mnt.mount_points() if mp.target.startswith(real_home + os.sep)]
        if not below:
            return ()
        mounted = set(below)
        named = {part for target in below for part in target[len(real_home) + 1:].split(os.sep)}
        home = str(self.home)
        found = []
        for layer in ready:
            if layer.mounts or layer.id not in named:
                continue
            path = str(self._path(layer))
            resolved = real_home + path[len(home):] if path.startswith(home + os.sep) else os.path.realpath(path)
            if resolved in mounted:
                found.append(layer.id)
        return tuple(found)

    def _repair_lost(self, records: list[Layer]) -> None:
        """Make again, before the sweep, what a power cut may have dropped after a record
        became durable (``records``: every record, as read at the start of reconcile). Not
        in a dry run. Default: nothing."""

    def _after_sweep(self, records: list[Layer]) -> None:
        """Bring the driver's own per-layer state (quota IDs, limits) in line with the records
        the sweep kept (``records``). Not in a dry run. Default: nothing."""

    def _recover_creating(self, layer: Layer) -> None:
        source = self.store.get(layer.origin) if layer.origin else None
        if layer.frozen and source is not None and source.state is LayerState.READY:
            outcome = self._recover_freeze(source, layer)
            if outcome is not False:
                with self.store.transaction():
                    if outcome != source.parent:
                        self.store.update(source.id, parent=outcome)
                    self.store.update(layer.id, state=LayerState.READY)
                return
        self._rollback(layer.id)

    def cleanup(self) -> None:
        """Release every mount, finish deferred removals, drop on-disk leftovers."""
        self.reconcile()
        for layer in self.store.all():
            if layer.mounts > 0:
                with self._locked(layer.id):
                    self._deactivate(layer)
                    self.store.update(layer.id, mounts=0)
        for layer in self.store.all():
            if layer.hidden:
                self._free_if_orphaned(layer.id)

    # ------------------------------------------------------------------ block metadata

    def _lineage(self, layer: Layer) -> set[str]:
        """The layer, the volume it was frozen from, and the same for each ancestor: two
        layers sharing any of these hold versions of one volume's blocks."""
        seen: set[str] = set()
        current: Layer | None = layer
        while current is not None and current.id not in seen and len(seen) < 20_000:
            seen.add(current.id)
            if current.origin:
                seen.add(current.origin)
            current = self.store.get(current.parent) if current.parent else None
        return seen

    def _block_layer(self, layer_id: str, what: str) -> Layer:
        layer = self._visible(layer_id, what)
        if not layer.block:
            raise FailedPrecondition(f"{what} {layer_id} holds a filesystem, not a raw block device: "
                                     "changed-block tracking is for block volumes")
        return layer

    def allocated_blocks(self, layer_id: str) -> BlockMap:
        if not self.supports_block_metadata:
            return super().allocated_blocks(layer_id)
        check_layer_id(layer_id)
        with self._locked(layer_id):
            return self._allocated_blocks(self._block_layer(layer_id, "layer"))

    def changed_blocks(self, base_id: str, layer_id: str) -> BlockMap:
        if not self.supports_block_metadata:
            return super().changed_blocks(base_id, layer_id)
        check_layer_id(base_id, "base layer id")
        check_layer_id(layer_id)
        with self._locked(base_id, layer_id):
            base = self._block_layer(base_id, "base layer")
            layer = self._block_layer(layer_id, "layer")
            if not self._lineage(base) & self._lineage(layer):
                raise FailedPrecondition(f"layers {base_id} and {layer_id} hold unrelated content (neither comes "
                                         "from the other's volume, snapshot or clone): no block delta between them")
            return self._changed_blocks(base, layer)

    # ------------------------------------------------------------------ diffs (naive default)

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        return NaiveDiffer(self).diff(layer_id, parent)

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        return NaiveDiffer(self).changes(layer_id, parent)

    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes]) -> int:
        return NaiveDiffer(self).apply_diff(layer_id, parent, stream)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        return NaiveDiffer(self).diff_size(layer_id, parent)
