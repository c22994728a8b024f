"""The vfs driver: a layer is a plain directory; a child starts as a full copy.

It works on any filesystem and is the last resort of the priority list. Copies use
reflinks where the filesystem shares extents (btrfs, XFS), so there a copy costs
metadata only; elsewhere (ext4) they are real copies (:mod:`csi.host.treecopy`).

On-disk layout under the driver home::

    layers.db        the layer records (csi.graphdriver.metastore)
    dir/<id>/        the content of layer <id> (writable and frozen alike)
    mnt/<id>/        a frozen layer's read-only bind mount of dir/<id>, while gotten
    tmp/<id>/        a layer being built (copy in progress); renamed to dir/<id> when done

* ``create(id, parent)`` copies ``dir/<parent>`` to ``tmp/<id>`` and renames it into
  ``dir/<id>``; ``freeze(src, id)`` does the same from ``dir/<src>`` (the frozen layer
  gets ``src``'s parent; ``src`` is untouched and stays writable). A freeze of a layer
  that is being written to at the same time copies each file as it is at that moment
  (no point-in-time guarantee across files, as with Docker's vfs).
* ``get`` of a writable layer returns ``dir/<id>``; of a frozen layer, ``mnt/<id>``,
  a read-only bind mount made on the first ``get`` and removed on the last ``put``.
  The frozen directory itself is additionally marked immutable (``chattr +i`` on its top
  directory: nothing can be added, removed or renamed at its top level) where the
  filesystem supports the flag.
* Size: on a home on XFS mounted with ``prjquota``, a writable layer created with a size
  gets its own XFS project ID on ``dir/<id>`` with a hard block limit of that size
  (:mod:`csi.graphdriver.quota.limits`): the limit covers the layer's whole content, the
  copy of its parent included (as a disk of that size would), so ``create`` refuses
  (OutOfRange) a size below what the parent occupies; ``resize`` raises the limit, removal
  releases the ID, frozen layers have none. Elsewhere ``status()`` says plainly that sizes
  are not enforced (no project quota on ext4 in this kernel; btrfs qgroups need
  subvolumes, which is the btrfs driver).

Crash safety: a layer directory appears under ``dir/`` only complete (rename; a copied layer's
files, directories and the rename are fsynced before its record commits, so a power cut keeps
it; an empty parentless one is not fsynced and is made again at start-up if a power cut lost
it, see :meth:`VfsDriver._repair_lost`); anything
in ``tmp/`` or ``mnt/`` or ``dir/`` that no record knows of is an orphan that
:meth:`LayerDriver.reconcile` removes through ``_destroy``. The project ID is assigned
to the staging directory ``tmp/<id>`` before the copy and follows the content to
``dir/<id>``, all while the record still says ``creating`` (a crash rolls it back and
``_destroy`` releases the ID under either name); after the start-up sweep
:meth:`VfsDriver._after_sweep` brings the quota records in line with the layer records.
"""

from __future__ import annotations

import array
import errno
import logging
import fcntl
import os
from pathlib import Path

from csi.host import mount as mnt
from csi.errors import OutOfRange
from csi.graphdriver.driver import Layer, LayerState
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.quota.limits import LayerLimits, no_enforcement
from csi.host.fsinfo import fstype_at, fsync_dir
from csi.host.treecopy import CopyStats, copy_tree, remove_tree, tree_bytes
from csi.ids import is_layer_id

log = logging.getLogger(__name__)

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x00000010


class VfsDriver(LayerDriver):
    """Layers as directories, children as (reflinked) copies. See module docstring."""

    name = "vfs"
    record_after_make = True  # a half-made layer (tmp/<id>, dir/<id>) is an orphan reconcile removes
    clone_copies = True  # a child is a full copy anyway: a clone copies the source once (no frozen base)

    # ------------------------------------------------------------------ layout

    @property
    def _dirs(self) -> Path:
        return self.home / "dir"

    @property
    def _mnts(self) -> Path:
        return self.home / "mnt"

    @property
    def _tmps(self) -> Path:
        return self.home / "tmp"

    last_copy: CopyStats | None = None  # what the latest create/freeze copy did (tests, benchmarks)

    def _setup(self) -> None:
        for sub in (self._dirs, self._mnts, self._tmps):
            sub.mkdir(mode=0o700, exist_ok=True)
        self.limits = LayerLimits.for_home(self.home, upper=lambda layer_id: self._dirs / layer_id)

    # ------------------------------------------------------------------ primitives

    def _build(self, layer_id: str, source: Path | None, size_bytes: int | None = None) -> None:
        """Make ``dir/<layer_id>`` as a copy of ``source`` (or empty), via ``tmp/``.

        With a size on a quota home the copy is made in ``tmp/<id>/content`` below a
        wrapper that already carries the layer's project ID and limit, so every inode is
        born in the project (symlinks and device nodes too, which cannot be re-tagged
        afterwards: XFS refuses to rename or link an inode of another project, EXDEV)."""
        temp = self._tmps / layer_id
        _remove_tree(temp)
        size = size_bytes or 0
        limits = self.limits if size > 0 else None
        content = temp
        if limits is not None:
            temp.mkdir(mode=0o700)
            limits.stage(temp, size)
            content = temp / "content"
        if source is None:
            content.mkdir(mode=0o755)
        else:  # the copy is on disk before the caller's record says the layer exists
            self.last_copy = copy_tree(source, content, durable=True)
        os.rename(content, self._dirs / layer_id)
        if source is not None:
            fsync_dir(self._dirs)
        if limits is not None:
            limits.settle(layer_id, size)
            temp.rmdir()

    def _make(self, layer: Layer, parent: Layer | None) -> None:
        if parent is not None:
            self._check_fits(layer, parent)
        self._build(layer.id, self._dirs / parent.id if parent is not None else None, layer.size_bytes)

    def _check_fits(self, layer: Layer, source: Layer) -> None:
        if self.limits is not None and layer.size_bytes:
            inherited = tree_bytes(self._dirs / source.id)
            if inherited > layer.size_bytes:
                raise OutOfRange(f"vfs: layer {layer.id} of {layer.size_bytes} bytes cannot hold the copy of "
                                 f"{source.id}, which occupies {inherited} bytes; ask for at least that much")

    def _make_copy(self, layer: Layer, source: Layer) -> None:
        """A clone: one copy of the writable source (a freeze and a child would copy twice)."""
        self._check_fits(layer, source)
        self._build(layer.id, self._dirs / source.id, layer.size_bytes)

    def _freeze(self, source: Layer, frozen: Layer) -> str | None:
        self._build(frozen.id, self._dirs / source.id)
        _set_immutable(self._dirs / frozen.id, True)
        return source.parent

    def _destroy(self, layer_id: str) -> None:
        mnt.unmount_all(self._mnts / layer_id)
        for path in (self._mnts / layer_id, self._tmps / layer_id, self._dirs / layer_id):
            _remove_tree(path)
        if self.limits is not None:  # after the files are gone: nothing is charged to the ID any more
            self.limits.release(layer_id)
            self.limits.release_staging(self._tmps / layer_id)

    def _set_size(self, layer: Layer, size_bytes: int) -> None:
        if self.limits is None:
            return super()._set_size(layer, size_bytes)
        self.limits.apply(layer.id, size_bytes)

    def _repair_lost(self, records: list[Layer]) -> None:
        """A new layer without parent is an empty directory whose creation is not fsynced (a
        directory fsync per create would double its cost): a power cut may lose it after its
        ready record is durable. It was empty when acknowledged, and any data an application
        fsynced into it since made the directory durable too (the journal commits in order),
        so a missing one is made again, empty. What exists is read with one ``listdir`` of
        ``dir/``, not a ``stat`` per layer."""
        present: set[str] | None = None
        for layer in records:
            if layer.state is LayerState.READY and not layer.frozen and layer.parent is None:
                if present is None:
                    present = set(os.listdir(self._dirs))
                if layer.id not in present:
                    log.warning("vfs: layer %s lost its empty directory in a power cut; making it again", layer.id)
                    self._build(layer.id, None, layer.size_bytes)

    def _after_sweep(self, records: list[Layer]) -> None:
        if self.limits is not None:
            self.limits.reconcile(records)

    def _on_disk(self) -> set[str]:
        found: set[str] = set()
        for sub in (self._dirs, self._mnts, self._tmps):
            # a name that is not a valid ID cannot be a layer: it is left alone
            found.update(name for name in os.listdir(sub) if is_layer_id(name))
        return found

    def _path(self, layer: Layer) -> Path:
        return (self._mnts if layer.frozen else self._dirs) / layer.id

    def _activate(self, layer: Layer, chain: list[Layer], mount_label: str) -> None:
        if not layer.frozen:
            return
        target = self._mnts / layer.id
        target.mkdir(mode=0o755, exist_ok=True)
        if not mnt.is_mount_point(target):
            mnt.bind(self._dirs / layer.id, target, readonly=True)

    def _deactivate(self, layer: Layer) -> None:
        if not layer.frozen:
            return
        target = self._mnts / layer.id
        mnt.unmount_all(target)
        try:
            target.rmdir()
        except FileNotFoundError:
            pass

    def _is_active(self, layer: Layer) -> bool:
        return not layer.frozen or mnt.is_mount_point(self._mnts / layer.id)

    def size_enforcement(self) -> str:
        if self.limits is not None:
            return self.limits.describe("each writable layer's directory, its parent's copy included")
        fs = fstype_at(self.home)
        if fs == "btrfs":
            return "none (vfs layers are plain directories, not btrfs subvolumes: qgroups need the btrfs driver)"
        return no_enforcement(fs, self.home)

    def _usage(self, layer: Layer) -> int | None:
        if self.limits is not None and not layer.frozen:
            usage = self.limits.usage(layer.id)
            if usage is not None:
                return usage.used_bytes
        return tree_bytes(self._dirs / layer.id)

    def _status_extra(self) -> list[tuple[str, str]]:
        fs = fstype_at(self.home)
        shares = "reflink (FICLONE)" if fs in ("btrfs", "xfs") else "full copy (copy_file_range)"
        return [("backing filesystem", fs), ("copy method", shares), *(self.limits.status() if self.limits else [])]



def _set_immutable(path: Path, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL on ``path`` itself; silently skipped where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        new = flags[0] | _FS_IMMUTABLE_FL if on else flags[0] & ~_FS_IMMUTABLE_FL
        if new != flags[0]:
            flags[0] = new
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
            raise
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Delete ``path`` (a tree or a leftover file); immutable top dirs are unlocked and
    mounts on them undone first."""
    if path.is_dir() and not path.is_symlink():
        _set_immutable(path, False)
        if mnt.is_mount_point(path):
            mnt.unmount_all(path)
    remove_tree(path)
