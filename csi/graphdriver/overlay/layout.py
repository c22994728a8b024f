"""The layered directory layout shared by the overlay and aufs drivers (Docker overlay2-like).

On-disk layout under a driver home::

    <home>/layers/<id>/diff     the layer's own content: the upper dir of a writable layer,
                                the whole (read-only) layer of a frozen one
    <home>/layers/<id>/work     overlay's work dir (writable layers only)
    <home>/layers/<id>/merged   where ``get`` mounts the layer's full view
    <home>/layers/<id>/link     the layer's short name (10 characters of [A-Z2-7])
    <home>/layers/<id>/lower    the short names of its ancestors, nearest first, ``:``-joined
                                (informational, as Docker writes it; mounts use the records)
    <home>/l/<short>            symlink -> ../layers/<id>/diff
    <home>/empty                an empty directory: the lower of a writable layer without parent
    <home>/tmp/                 private scratch mounts (lower views for diffs); swept at start-up

A mount's option string names lowers by short name with the mount's working directory set
to ``<home>/l``, so 500 lowers stay near one page (``csi.host.mount`` switches to the new mount
API beyond it).

Whiteouts come in two on-disk forms, described by :class:`WhiteoutFormat`: overlay's
(a 0/0 character device named like the deleted entry; ``trusted.overlay.opaque=y`` on an
opaque directory) and aufs's, which is already the OCI form (``.wh.NAME`` files, a
``.wh..wh..opq`` file inside an opaque directory, ``.wh..wh.*`` bookkeeping entries).

:func:`copy_tree` copies a layer's diff dir exactly (modes, owners, times, xattrs, hard
links, symlinks, devices including whiteouts, sparse holes) and clones file extents
(``FICLONE``) where the filesystem shares them, falling back to ``copy_file_range``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from csi.host import mount as mnt
from csi.ids import is_layer_id

SHORT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
SHORT_LEN = 10
OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE = ".wh..wh..opq"
AUFS_META_PREFIX = ".wh..wh."
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_FICLONE = 0x40049409


@dataclass(frozen=True)
class Layout:
    """Paths of one driver home. Layer IDs must be validated before they get here."""

    home: Path

    @property
    def layers(self) -> Path:
        return self.home / "layers"

    @property
    def links(self) -> Path:
        return self.home / "l"

    @property
    def empty(self) -> Path:
        return self.home / "empty"

    @property
    def scratch(self) -> Path:
        return self.home / "tmp"

    def layer_dir(self, layer_id: str) -> Path:
        return self.layers / layer_id

    def diff(self, layer_id: str) -> Path:
        return self.layers / layer_id / "diff"

    def work(self, layer_id: str) -> Path:
        return self.layers / layer_id / "work"

    def merged(self, layer_id: str) -> Path:
        return self.layers / layer_id / "merged"

    def prepare(self) -> None:
        """Create the top-level directories (idempotent)."""
        for path in (self.layers, self.links, self.empty, self.scratch):
            path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.empty, 0o755)

    # ------------------------------------------------------------------ per layer

    def make(self, layer_id: str, *, writable: bool, lowers: list[str], with_diff: bool = True) -> str:
        """Create the layer's directories, its short name and link; return the short name.

        ``lowers`` are the ancestors' short names, nearest first. Order: directory,
        ``link`` file, then the ``l/`` symlink, so a crash leaves nothing :meth:`destroy`
        cannot find.
        """
        top = self.layer_dir(layer_id)
        top.mkdir(mode=0o700)
        if with_diff:
            self.diff(layer_id).mkdir(mode=0o755)
        if writable:
            self.work(layer_id).mkdir(mode=0o700)
        self.merged(layer_id).mkdir(mode=0o755)
        short = "".join(secrets.choice(SHORT_ALPHABET) for _ in range(SHORT_LEN))
        write_atomic(top / "link", short)
        self.write_lower(layer_id, lowers)
        os.symlink(f"../layers/{layer_id}/diff", self.links / short)
        return short

    def short(self, layer_id: str) -> str:
        """The layer's short name (its ``l/`` link)."""
        return (self.layer_dir(layer_id) / "link").read_text(encoding="ascii").strip()

    def write_lower(self, layer_id: str, lowers: list[str]) -> None:
        path = self.layer_dir(layer_id) / "lower"
        if lowers:  # informational: not fsynced
            path.with_name("lower.tmp").write_text(":".join(f"l/{s}" for s in lowers), encoding="ascii")
            os.replace(path.with_name("lower.tmp"), path)
        else:
            path.unlink(missing_ok=True)

    def reset_work(self, layer_id: str) -> None:
        """Empty the work dir of an unmounted writable layer (overlay leaves ``work/work``)."""
        work = self.work(layer_id)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(mode=0o700)

    def destroy(self, layer_id: str) -> None:
        """Unmount and delete everything of ``layer_id``; absent or partial state is fine."""
        top = self.layer_dir(layer_id)
        merged = self.merged(layer_id)
        if merged.exists():
            for mp in mnt.mounts_under(merged):
                mnt.unmount(mp.target, detach=True)
        try:
            short = self.short(layer_id)
        except (FileNotFoundError, NotADirectoryError):
            short = ""
        if short and all(c in SHORT_ALPHABET for c in short):
            (self.links / short).unlink(missing_ok=True)
        if top.exists() or top.is_symlink():
            remove_path(top)

    def on_disk(self) -> set[str]:
        """IDs that have a directory under ``layers/``."""
        if not self.layers.exists():
            return set()
        return {name for name in os.listdir(self.layers) if is_layer_id(name)}

    def sweep(self) -> None:
        """Start-up hygiene: drop dangling ``l/`` links and leftover scratch mounts."""
        for name in os.listdir(self.links):
            link = self.links / name
            if not link.exists():
                link.unlink(missing_ok=True)
        for mp in mnt.mounts_under(self.scratch):
            if os.path.realpath(mp.target) != os.path.realpath(self.scratch):
                mnt.unmount(mp.target, detach=True)
        for name in os.listdir(self.scratch):
            remove_path(self.scratch / name)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file via a temporary name and rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_path(path: Path) -> None:
    """Remove a file, symlink or whole tree; absent is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=False)
    else:
        os.unlink(path)


# ---------------------------------------------------------------------- whiteout formats


@dataclass(frozen=True)
class WhiteoutFormat:
    """How a layer dir marks deletions (whiteouts) and opaque directories.

    ``native_oci`` is True for aufs: its on-disk names already are the OCI names.
    """

    name: str
    native_oci: bool

    def whiteout_target(self, dirpath: str, entry: str, st: os.stat_result) -> str | None:
        """If ``entry`` (in ``dirpath``) is a whiteout, the name it deletes, else None."""
        if self.native_oci:
            if entry.startswith(OCI_WHITEOUT_PREFIX) and not entry.startswith(AUFS_META_PREFIX):
                return entry[len(OCI_WHITEOUT_PREFIX):]
            return None
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return entry
        return None

    def is_bookkeeping(self, entry: str) -> bool:
        """Entries that are neither content nor whiteouts (aufs's ``.wh..wh.*``)."""
        return self.native_oci and entry.startswith(AUFS_META_PREFIX)

    def is_opaque(self, path: str) -> bool:
        if self.native_oci:
            return os.path.lexists(os.path.join(path, OCI_OPAQUE))
        try:
            return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
        except OSError:
            return False

    def make_whiteout(self, dirpath: str, name: str) -> None:
        if self.native_oci:
            fd = os.open(os.path.join(dirpath, OCI_WHITEOUT_PREFIX + name), os.O_CREAT | os.O_WRONLY, 0o444)
            os.close(fd)
        else:
            os.mknod(os.path.join(dirpath, name), 0o600 | stat.S_IFCHR, 0)

    def existing_whiteout(self, dirpath: str, name: str) -> str | None:
        """Path of the whiteout for ``name`` in ``dirpath`` if there is one."""
        path = os.path.join(dirpath, OCI_WHITEOUT_PREFIX + name if self.native_oci else name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        entry = os.path.basename(path)
        return path if self.whiteout_target(dirpath, entry, st) is not None else None

    def make_opaque(self, path: str) -> None:
        if self.native_oci:
            fd = os.open(os.path.join(path, OCI_OPAQUE), os.O_CREAT | os.O_WRONLY, 0o444)
            os.close(fd)
        else:
            os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)

    def is_internal_xattr(self, name: str) -> bool:
        """Xattrs that belong to the filesystem's bookkeeping, not to the content."""
        return not self.native_oci and name.startswith(OVERLAY_XATTR_PREFIX)


OVERLAY_WHITEOUTS = WhiteoutFormat("overlay", native_oci=False)
AUFS_WHITEOUTS = WhiteoutFormat("aufs", native_oci=True)


# ---------------------------------------------------------------------- exact tree copy


def copy_tree(src: Path, dst: Path, *, durable: bool = False,
              links: dict[tuple[int, int], str] | None = None) -> int:
    """Copy the directory ``src`` to the new path ``dst`` exactly; return bytes of file data.

    Extents are cloned when the filesystem allows (btrfs), so the cost is metadata only;
    otherwise ``copy_file_range`` copies in the kernel, keeping holes of sparse files.
    ``durable``: fsync every copied file and directory (only what was copied).
    ``links``: hard links already copied, (st_dev, st_ino) -> copy; pass one dict to
    several calls to keep links between the trees they copy.
    """
    copied = 0
    links = {} if links is None else links
    dirs: list[tuple[str, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out_dir = os.path.normpath(os.path.join(dst, rel))
        st = os.lstat(dirpath)
        os.mkdir(out_dir, 0o700)
        dirs.append((out_dir, st))
        entries = list(filenames)
        for name in list(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                dirnames.remove(name)
                entries.append(name)
        for name in entries:
            s, d = os.path.join(dirpath, name), os.path.join(out_dir, name)
            copied += copy_leaf(s, d, os.lstat(s), links, durable=durable)
    for out_dir, st in reversed(dirs):
        copy_metadata(os.path.join(src, os.path.relpath(out_dir, dst)), out_dir, st)
        if durable:
            fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return copied


def copy_leaf(src: str, dst: str, st: os.stat_result, links: dict[tuple[int, int], str], *,
              durable: bool = False) -> int:
    """Copy one non-directory (``st`` = its lstat) with its metadata, or hard-link ``dst``
    to the copy of the same inode in ``links``; return bytes of file data copied."""
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        os.link(links[key], dst)
        return 0
    copied = 0
    if stat.S_ISREG(st.st_mode):
        copied = copy_file(src, dst, st, durable=durable)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    else:
        os.mknod(dst, st.st_mode, st.st_rdev)
    copy_metadata(src, dst, st)
    if st.st_nlink > 1:
        links[key] = dst
    return copied


def copy_file(src: str, dst: str, st: os.stat_result, *, durable: bool = False) -> int:
    """Clone or copy one regular file's data; return its size."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise
            _copy_data(fin.fileno(), fout.fileno(), st.st_size)
        if durable:
            os.fsync(fout.fileno())
    return st.st_size


def _copy_data(fin: int, fout: int, size: int) -> None:
    """copy_file_range over the data segments (holes stay holes)."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fin, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break
        try:
            hole = os.lseek(fin, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        pos = data
        while pos < hole:
            n = os.copy_file_range(fin, fout, hole - pos, pos, pos)
            if n == 0:
                break
            pos += n
        offset = hole
    os.ftruncate(fout, size)


def copy_metadata(src: str, dst: str, st: os.stat_result) -> None:
    """Owner, mode, xattrs, then times (last: the others change ctime only)."""
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
