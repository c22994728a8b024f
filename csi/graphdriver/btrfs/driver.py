"""The btrfs driver: one btrfs subvolume per layer, snapshots for children and freezes,
qgroups for sizes. All btrfs work goes through :mod:`csi.graphdriver.btrfs.ioctl`
(direct ioctls; nothing parses ``btrfs`` command output).

On-disk layout (``<home>`` must be on btrfs)::

    <home>/layers.db              layer records (csi.graphdriver.metastore)
    <home>/subvolumes/<id>        the layer: a subvolume (frozen layers: read-only)
    <home>/subvolumes/.tmp-<id>   a subvolume being made; never a valid ID (IDs
                                  cannot start with '.'), removed by reconcile

Operations:

* create without parent: a new empty subvolume; with a (frozen) parent: a writable
  snapshot of the parent's subvolume. Both are made under the temporary name, get
  their qgroup limit, then are renamed into place, so a crash leaves either nothing or
  a complete layer.
* freeze: a read-only snapshot of the writable layer's subvolume, whether it is in
  use or not. The snapshot ioctl itself flushes the source's dirty data and commits a
  transaction, so no ``syncfs`` is needed; its cost does not depend on the data size.
  A freeze interrupted after the snapshot exists is finished at restart.
* remove: ``SNAP_DESTROY_V2`` (root may delete read-only subvolumes); subvolumes a
  user nested inside a layer are deleted first. btrfs frees the extents in the
  background, so free space returns shortly after, not at once.
* get: the subvolume path itself, no mount; frozen layers are read-only subvolumes,
  so their view is read-only by construction.

Durability: the snapshot ioctl commits a transaction, so a snapshot (a freeze, a child)
under its temporary name survives even a power cut; the rename and the limit that
follow are not fsync'ed (on btrfs a directory fsync with a subvolume entry forces a
full commit, ~11 ms each on the test machines, which would double the cost of a
freeze). ``kill -9`` cannot lose them (they are kernel state once the call returns);
what a power cut could lose, start-up repairs: a ready layer found only under its
temporary name is renamed into place, and limits that differ from the records are
set again. A new *empty* subvolume (create without parent) is made under its final
name and not committed at all: its record's fsync is then a log sync of the home's
subvolume (~1 ms), where a subvolume rename before it would make that fsync a full
transaction commit, whose cost grows with the filesystem's metadata (4 ms on an empty
filesystem, 9-11 ms with 12,500 subvolumes: CreateVolume's time grew with the node's
population). A power cut may then keep the record and lose the subvolume; start-up
makes it again, empty, with its limit and properties (:meth:`BtrfsDriver._repair_lost`).
That is safe because it was empty when acknowledged, and an application's fsync inside
a subvolume that no transaction has committed yet forces a full commit (btrfs cannot
log into an uncommitted subvolume), which makes the subvolume durable with that data.

Mutable properties (``modify``, CSI ControllerModifyVolume, also at create):
``compression`` = ``zstd`` | ``lzo`` | ``zlib`` | ``none`` — the btrfs compression property
of the layer's subvolume root (the ``btrfs.compression`` xattr, as ``btrfs property set``),
inherited by every file and directory created in the volume afterwards: new writes to new
files are compressed (``none``: never); files that already exist keep their own property.
It lives in the subvolume, so snapshots and clones keep it.

Size: btrfs qgroups. ``_setup`` enables quota on the filesystem if it is off and waits
for the initial rescan. That has a cost for the whole filesystem: every extent change
is accounted at transaction commit (snapshot deletion and balance become noticeably
slower with many snapshots), and the first rescan reads all metadata once. The option
``btrfs.quota=off`` skips it (sizes are then not enforced and ``status()`` says so).
The limit is on **referenced** bytes of the layer's level-0 qgroup: everything the
volume holds, shared extents included, as a disk of that size would. It stays
stable when siblings, snapshots or the parent come and go (an exclusive limit would
grow when a snapshot shares the data and shrink when the parent goes). Consequently a
child's size must be at least its parent's referenced bytes (``OutOfRange``
otherwise), and a freeze does not free room in the volume. Snapshots inherit the
source's limit on this kernel, so every new subvolume gets its limit set (or cleared,
for frozen layers) explicitly. ``size_bytes`` 0 or None means no limit. Counters and
usage are those of the last transaction commit (btrfs commits at least every 30 s).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from csi.errors import (
    AlreadyExists, Busy, IncompatibleFilesystem, InvalidArgument, NoSpace, NotFound, NotSupported,
    OutOfRange, ReadOnly, StrataError,
)
from csi.graphdriver.btrfs import ioctl as ioc
from csi.graphdriver.driver import Layer, LayerState
from csi.graphdriver.layered import LayerDriver
from csi.host.fsinfo import mount_of
from csi.ids import is_layer_id

log = logging.getLogger(__name__)
TEMP_PREFIX = ".tmp-"
COMPRESSION = "compression"
COMPRESSION_VALUES = ("zstd", "lzo", "zlib", "none")
OPTION_QUOTA = "btrfs.quota"
KNOWN_OPTIONS = frozenset({OPTION_QUOTA})

_ERRNO_TYPES: Mapping[int, type[StrataError]] = {
    errno.ENOSPC: NoSpace, errno.EDQUOT: NoSpace, errno.EEXIST: AlreadyExists, errno.EBUSY: Busy,
    errno.ENOENT: NotFound, errno.EROFS: ReadOnly, errno.EINVAL: InvalidArgument,
}


@dataclass(frozen=True)
class QuotaSetup:
    """Whether this driver enforces sizes, and the words ``status()`` uses."""

    enforced: bool
    detail: str


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn an OSError into the matching strata error, chained to it."""
    try:
        yield
    except OSError as exc:
        kind = _ERRNO_TYPES.get(exc.errno or 0, StrataError)
        raise kind(f"btrfs: {what}: {exc.strerror or exc}") from exc


@contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _kernel_has_btrfs() -> bool:
    with open("/proc/filesystems", encoding="ascii") as f:
        return any(line.split()[-1] == "btrfs" for line in f if line.strip())


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _filesystem_name(path: Path, magic: int) -> str:
    """The mount table's name for the filesystem holding ``path`` (statfs magic if unknown)."""
    mp = mount_of(path)
    if mp is not None:
        return mp.fstype
    return ioc.FILESYSTEM_NAMES.get(magic, f"a filesystem with magic {magic:#x}")


class BtrfsDriver(LayerDriver):
    """A subvolume per layer; see the module docstring."""

    name = "btrfs"
    mutable_properties = frozenset({COMPRESSION})
    record_after_make = True  # a half-made subvolume (.tmp-<id>, <id>) is an orphan reconcile removes

    # ------------------------------------------------------------------ set-up

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        if not _kernel_has_btrfs():
            raise NotSupported("btrfs: the kernel has no btrfs (not listed in /proc/filesystems)")
        anchor = _nearest_existing(home)
        magic = ioc.filesystem_magic(anchor)
        if magic != ioc.BTRFS_SUPER_MAGIC:
            raise IncompatibleFilesystem(f"btrfs: {home} is on {_filesystem_name(anchor, magic)}, not btrfs")
        unknown = sorted(k for k in options if k.startswith("btrfs.") and k not in KNOWN_OPTIONS)
        if unknown:
            raise InvalidArgument(f"btrfs: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_OPTIONS))}")
        quota = options.get(OPTION_QUOTA, "on")
        if quota not in ("on", "off"):
            raise InvalidArgument(f"btrfs: option {OPTION_QUOTA} must be 'on' or 'off', got {quota!r}")

    def _setup(self) -> None:
        self.subvolumes = self.home / "subvolumes"
        self.subvolumes.mkdir(mode=0o700, exist_ok=True)
        self._in_flight: set[str] = set()  # temp names this instance is making right now
        self._in_flight_guard = threading.Lock()
        self.quota = self._setup_quota()

    def _setup_quota(self) -> QuotaSetup:
        if self.options.get(OPTION_QUOTA, "on") == "off":
            return QuotaSetup(False, f"none (btrfs quota disabled by option {OPTION_QUOTA}=off)")
        with _open_dir(self.subvolumes) as fd:
            try:
                if ioc.quota_status(fd) is None:
                    ioc.quota_enable(fd)
                ioc.quota_rescan_wait(fd)
            except OSError as exc:
                return QuotaSetup(False, f"none (btrfs quota could not be enabled: {exc.strerror or exc})")
        return QuotaSetup(True, "btrfs qgroups (limit on referenced bytes of each writable layer)")

    def size_enforcement(self) -> str:
        return self.quota.detail

    # ------------------------------------------------------------------ helpers

    def _temp_name(self, layer_id: str) -> str:
        return TEMP_PREFIX + layer_id

    @contextmanager
    def _making(self, layer_id: str) -> Iterator[str]:
        """Mark ``.tmp-<id>`` and ``<id>`` as in flight (so reconcile leaves them alone) while made."""
        temp = self._temp_name(layer_id)
        with self._in_flight_guard:
            self._in_flight.update((temp, layer_id))
        try:
            yield temp
        finally:
            with self._in_flight_guard:
                self._in_flight.difference_update((temp, layer_id))

    def _publish(self, dir_fd: int, temp: str, layer_id: str) -> None:
        """Rename a finished subvolume into place (durability: see the module docstring)."""
        os.rename(temp, layer_id, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def _subvolume_id(self, path: Path) -> int:
        with _open_dir(path) as fd:
            return ioc.subvolume_info(fd).id

    def _apply_limit(self, path: Path, size_bytes: int | None) -> None:
        """Limit the referenced bytes of the subvolume at ``path`` (0/None: no limit)."""
        if not self.quota.enforced:
            return
        with _open_dir(path) as fd:
            ioc.set_qgroup_limit(fd, ioc.qgroup_id(ioc.subvolume_info(fd).id), max_referenced=size_bytes or None)

    def _referenced(self, path: Path) -> int | None:
        if not self.quota.enforced:
            return None
        with _open_dir(path) as fd:
            status = ioc.quota_status(fd)
            if status is None or status.rescanning or status.inconsistent:
                return None
            usage = ioc.qgroup_usage(fd, ioc.qgroup_id(ioc.subvolume_info(fd).id))
        return None if usage is None else usage.referenced

    # ------------------------------------------------------------------ primitives

    def _path(self, layer: Layer) -> Path:
        return self.subvolumes / layer.id

    def _make(self, layer: Layer, parent: Layer | None) -> None:
        size = layer.size_bytes or None
        if parent is not None and size is not None:
            with _translated(f"read the size of parent layer {parent.id}"):
                inherited = self._referenced(self._path(parent))
            if inherited is not None and inherited > size:
                raise OutOfRange(
                    f"btrfs: layer {layer.id} of {size} bytes cannot hold its parent {parent.id}, "
                    f"which references {inherited} bytes; ask for at least that much"
                )
        with self._making(layer.id) as temp, _open_dir(self.subvolumes) as dir_fd:
            with _translated(f"create layer {layer.id}"):
                if parent is None:  # under its final name, not committed (see the module docstring)
                    self._make_empty(dir_fd, layer.id, layer)
                    return
                with _open_dir(self._path(parent)) as source_fd:
                    ioc.snapshot(source_fd, dir_fd, temp, readonly=False)
                self._apply_limit(self.subvolumes / temp, size)
                self._apply_properties(self.subvolumes / temp, layer.extra.get("properties", {}))
                self._publish(dir_fd, temp, layer.id)

    def _make_empty(self, dir_fd: int, name: str, layer: Layer) -> None:
        """An empty subvolume ``name`` in ``subvolumes/`` with ``layer``'s limit and properties."""
        ioc.create_subvolume(dir_fd, name)
        self._apply_limit(self.subvolumes / name, layer.size_bytes)
        self._apply_properties(self.subvolumes / name, layer.extra.get("properties", {}))

    def _check_properties(self, properties: Mapping[str, str]) -> None:
        super()._check_properties(properties)
        value = properties.get(COMPRESSION)
        if value is not None and value not in COMPRESSION_VALUES:
            raise InvalidArgument(f"btrfs: compression {value!r} is not one of {', '.join(COMPRESSION_VALUES)}")

    def _apply_properties(self, path: Path, properties: Mapping[str, str]) -> None:
        if COMPRESSION in properties:
            ioc.set_compression(path, properties[COMPRESSION])

    def _modify(self, layer: Layer, path: Path, properties: Mapping[str, str]) -> None:
        with _translated(f"set {', '.join(sorted(properties))} of layer {layer.id}"):
            self._apply_properties(path, properties)

    def _freeze(self, source: Layer, frozen: Layer) -> str | None:
        with self._making(frozen.id) as temp, _open_dir(self.subvolumes) as dir_fd:
            with _translated(f"freeze layer {source.id} as {frozen.id}"):
                with _open_dir(self._path(source)) as source_fd:
                    ioc.snapshot(source_fd, dir_fd, temp, readonly=True)
                self._apply_limit(self.subvolumes / temp, None)
                self._publish(dir_fd, temp, frozen.id)
        return source.parent

    def _recover_freeze(self, source: Layer, frozen: Layer) -> str | None | bool:
        """Finish a freeze whose read-only snapshot was complete (the snapshot ioctl is
        atomic: a read-only subvolume under the temp or final name is whole)."""
        with _open_dir(self.subvolumes) as dir_fd, _translated(f"finish freezing {frozen.id}"):
            for name in (frozen.id, self._temp_name(frozen.id)):
                path = self.subvolumes / name
                if not ioc.is_subvolume_root(path):
                    continue
                with _open_dir(path) as fd:
                    if not ioc.get_flags(fd) & ioc.SUBVOL_RDONLY:
                        continue
                self._apply_limit(path, None)
                if name != frozen.id:
                    self._publish(dir_fd, name, frozen.id)
                return source.parent
        return False

    def _destroy(self, layer_id: str) -> None:
        with _open_dir(self.subvolumes) as dir_fd, _translated(f"remove layer {layer_id}"):
            for name in (layer_id, self._temp_name(layer_id)):
                self._delete_entry(dir_fd, name)

    def _delete_entry(self, dir_fd: int, name: str) -> None:
        """Delete ``subvolumes/<name>``, whatever it is; absent is fine."""
        path = self.subvolumes / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
        elif st.st_ino == ioc.FIRST_FREE_OBJECTID:
            try:
                ioc.destroy_subvolume(dir_fd, name)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                self._destroy_nested(path)
                ioc.destroy_subvolume(dir_fd, name)
        else:
            shutil.rmtree(path)

    def _destroy_nested(self, root: Path) -> None:
        """Delete subvolumes a user created inside a layer, deepest first."""
        nested: list[Path] = []
        for current, dirs, _files in os.walk(root):
            for d in dirs:
                child = Path(current) / d
                if os.lstat(child).st_ino == ioc.FIRST_FREE_OBJECTID:
                    nested.append(child)
        for child in sorted(nested, key=lambda p: len(p.parts), reverse=True):
            with _open_dir(child.parent) as parent_fd:
                ioc.destroy_subvolume(parent_fd, child.name)

    def _on_disk(self) -> set[str]:
        with self._in_flight_guard:
            busy = set(self._in_flight)
        return {name for name in os.listdir(self.subvolumes) if is_layer_id(name) and name not in busy}

    def _set_size(self, layer: Layer, size_bytes: int) -> None:
        if not self.quota.enforced:
            return super()._set_size(layer, size_bytes)
        with _translated(f"resize layer {layer.id}"):
            self._apply_limit(self._path(layer), size_bytes)

    def _usage(self, layer: Layer) -> int | None:
        """Referenced bytes of the layer's qgroup (the quantity its limit applies to)."""
        with _translated(f"read the usage of layer {layer.id}"):
            return self._referenced(self._path(layer))

    def _status_extra(self) -> list[tuple[str, str]]:
        if not self.quota.enforced:
            return [("btrfs quota", "off")]
        with _open_dir(self.subvolumes) as fd, _translated("read the quota status"):
            status = ioc.quota_status(fd)
        if status is None:
            return [("btrfs quota", "off (disabled since start-up)")]
        state = "rescan in progress" if status.rescanning else "inconsistent" if status.inconsistent else "consistent"
        mode = "simple quotas" if status.simple else "full qgroup accounting"
        return [("btrfs quota", f"{mode}, {state}")]

    # ------------------------------------------------------------------ recovery

    def _repair_lost(self, records: list[Layer]) -> None:
        """What a power cut may lose after a record became durable: a ready layer found only
        under its temporary name lost its rename (renamed into place); a ready writable layer
        without parent found under neither name was an empty subvolume no transaction had
        committed (made again, empty, with its limit and properties: see the module docstring).
        What exists is read with one ``listdir``, not a lookup per layer."""
        names = set(os.listdir(self.subvolumes))
        with _open_dir(self.subvolumes) as dir_fd:
            for layer in records:
                if layer.state is not LayerState.READY or layer.id in names:
                    continue
                temp = self._temp_name(layer.id)
                if temp in names and ioc.is_subvolume_root(self.subvolumes / temp):
                    with _translated(f"restore layer {layer.id} from {temp}"):
                        self._publish(dir_fd, temp, layer.id)
                elif not layer.frozen and layer.parent is None:
                    log.warning("btrfs: layer %s lost its empty subvolume in a power cut; making it again", layer.id)
                    with _translated(f"make layer {layer.id} again"):
                        self._make_empty(dir_fd, layer.id, layer)

    def _after_sweep(self, records: list[Layer]) -> None:
        """Remove stale ``.tmp-`` subvolumes, then set again the properties and limits a power
        cut lost (they differ from the records): every layer's subvolume ID and every limit come
        from two tree searches, not two ioctls per layer; properties are read only for the
        layers whose records name some."""
        for layer in records:
            wanted = layer.extra.get("properties", {}).get(COMPRESSION)
            path = self._path(layer)
            if (wanted is not None and layer.state is LayerState.READY and not layer.frozen
                    and ioc.is_subvolume_root(path) and ioc.get_compression(path) != wanted):
                with _translated(f"restore the properties of layer {layer.id}"):
                    self._apply_properties(path, layer.extra["properties"])
        with self._in_flight_guard:
            busy = set(self._in_flight)
        with _open_dir(self.subvolumes) as dir_fd:
            for name in os.listdir(self.subvolumes):
                if name.startswith(TEMP_PREFIX) and name not in busy:
                    with _translated(f"remove stale {name}"):
                        self._delete_entry(dir_fd, name)
            if not self.quota.enforced:
                return
            with _translated("read the subvolumes and qgroup limits"):
                subvolumes = ioc.subvolumes_in(dir_fd)
                limits = ioc.qgroup_limits(dir_fd)
        for layer in records:
            subvolume = subvolumes.get(layer.id)
            if layer.state is not LayerState.READY or layer.frozen or subvolume is None:
                continue
            current = limits.get(ioc.qgroup_id(subvolume))
            if (current.max_referenced if current else None) != (layer.size_bytes or None):
                with _translated(f"restore the size limit of layer {layer.id}"):
                    self._apply_limit(self._path(layer), layer.size_bytes)
