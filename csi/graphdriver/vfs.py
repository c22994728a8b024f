"""The vfs driver: a layer is a plain directory; a child starts as a full copy.

It works on any filesystem and is the last resort of the priority list. Copies use
reflinks where the filesystem shares extents (btrfs, XFS), so there a copy costs
metadata only; elsewhere (ext4) they are real copies (:mod:`csi.graphdriver.treecopy`).

On-disk layout under the driver home::

    layers.db        the layer records (csi.graphdriver.metadata)
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
* Size: no enforcement yet; ``status()`` says so plainly (ext4 has no project quota in
  this kernel; btrfs qgroups need subvolumes, which is the btrfs driver). The hook for
  XFS homes mounted with ``prjquota``: :class:`csi.graphdriver.xfs_quota.ProjectQuota` —
  ``assign`` the renamed ``dir/<id>`` in ``_make`` when ``layer.size_bytes`` is set,
  ``resize`` in ``_set_size``, ``release`` in ``_destroy``, and report it in
  ``size_enforcement``.

Crash safety: a layer directory appears under ``dir/`` only complete (rename); anything
in ``tmp/`` or ``mnt/`` or ``dir/`` that no record knows of is an orphan that
:meth:`LayerDriver.reconcile` removes through ``_destroy``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import stat
from pathlib import Path

from csi import mount as mnt
from csi.graphdriver.base import Layer, LayerDriver
from csi.graphdriver.treecopy import CopyStats, copy_tree, remove_tree, tree_bytes
from csi.ids import is_layer_id

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x00000010


class VfsDriver(LayerDriver):
    """Layers as directories, children as (reflinked) copies. See module docstring."""

    name = "vfs"

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

    # ------------------------------------------------------------------ primitives

    def _build(self, layer_id: str, source: Path | None) -> None:
        """Make ``dir/<layer_id>`` as a copy of ``source`` (or empty), via ``tmp/``."""
        temp = self._tmps / layer_id
        _remove_tree(temp)
        if source is None:
            temp.mkdir(mode=0o755)
        else:
            self.last_copy = copy_tree(source, temp)
        os.rename(temp, self._dirs / layer_id)

    def _make(self, layer: Layer, parent: Layer | None) -> None:
        self._build(layer.id, self._dirs / parent.id if parent is not None else None)

    def _freeze(self, source: Layer, frozen: Layer) -> str | None:
        self._build(frozen.id, self._dirs / source.id)
        _set_immutable(self._dirs / frozen.id, True)
        return source.parent

    def _destroy(self, layer_id: str) -> None:
        mnt.unmount_all(self._mnts / layer_id)
        for path in (self._mnts / layer_id, self._tmps / layer_id, self._dirs / layer_id):
            _remove_tree(path)

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
        fs = _fs_name(self.home)
        if fs == "btrfs":
            return "none (vfs layers are plain directories, not btrfs subvolumes: qgroups need the btrfs driver)"
        if fs == "xfs":
            return "none (XFS project quota is not enabled for the vfs home)"
        return f"none (no project quota on {fs})"

    def _usage(self, layer: Layer) -> int | None:
        return tree_bytes(self._dirs / layer.id)

    def _status_extra(self) -> list[tuple[str, str]]:
        fs = _fs_name(self.home)
        shares = "reflink (FICLONE)" if fs in ("btrfs", "xfs") else "full copy (copy_file_range)"
        return [("backing filesystem", fs), ("copy method", shares)]


def _fs_name(path: Path) -> str:
    """The filesystem type holding ``path``, from the mount table."""
    real = os.path.realpath(path)
    best = None
    for mp in mnt.mount_points():
        if (real + "/").startswith(mp.target.rstrip("/") + "/") and (best is None or len(mp.target) >= len(best.target)):
            best = mp
    return best.fstype if best is not None else "unknown"


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
    """Delete ``path`` (a tree or a leftover file); immutable top dirs are unlocked first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    _set_immutable(path, False)
    if mnt.is_mount_point(path):
        mnt.unmount_all(path)
    remove_tree(path)
