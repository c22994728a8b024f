"""Native diffs of layered (overlay/aufs) layers: a layer's diff dir <-> an OCI layer tar.

A layer's diff dir holds exactly its changes against its parent, so its OCI layer tar
(uncompressed PAX, readable by GNU tar and Python's tarfile) is the diff dir itself with
whiteouts translated by a :class:`~csi.graphdriver.overlay.layout.WhiteoutFormat`:

* ``diff_stream`` / ``write_layer_tar``: the root as ``./``, then entries in sorted
  pre-order; a whiteout becomes an empty ``.wh.NAME`` member, an opaque directory is its
  own member followed by ``DIR/.wh..wh..opq``; hard links are stored once; xattrs as
  ``SCHILY.xattr.*``; mtimes with nanoseconds in the PAX ``mtime`` record. The
  filesystem's bookkeeping xattrs (``trusted.overlay.*``) are left out.
* ``apply_layer_tar``: the reverse, into the diff dir of an unmounted layer, given a
  read-only view of the parent (``below``) to decide where whiteouts are needed, which
  new directories must be opaque, and to copy up hard-link targets from below.
* ``layer_changes`` / ``diff_size``: read the diff dir (plus ``below`` for changes).

Paths from a tar are cleaned (no absolute paths, no ``..``) and every component is
checked with lstat: nothing is read or written through a symlink and nothing lands
outside the diff dir. A failed apply raises InvalidArgument; what it had written stays
in the (writable, unmounted) layer, which the caller removes.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from csi.errors import InvalidArgument
from csi.graphdriver.driver import Change, ChangeKind
from csi.graphdriver.overlay.layout import (
    OCI_OPAQUE, OCI_WHITEOUT_PREFIX, WhiteoutFormat, copy_file, copy_metadata, remove_path,
)
from csi.host.pipestream import pipe_stream, send_file_data, write_all


def diff_stream(layer_dir: Path, fmt: WhiteoutFormat) -> IO[bytes]:
    """The OCI layer tar (PAX) of ``layer_dir``, produced by a thread into a pipe."""
    return pipe_stream(lambda out: write_layer_tar(layer_dir, fmt, out), f"diff-{layer_dir.parent.name}")


def _walk(layer_dir: Path) -> Iterator[tuple[str, str, str, os.stat_result]]:
    """(relative dir, entry name, full path, lstat) in sorted pre-order, root excluded."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(layer_dir, rel_dir)
        subdirs = []
        for name in sorted(os.listdir(full_dir)):
            full = os.path.join(full_dir, name)
            st = os.lstat(full)
            yield rel_dir, name, full, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(os.path.join(rel_dir, name))
        stack.extend(reversed(subdirs))


def _tarinfo(name: str, full: str, st: os.stat_result, fmt: WhiteoutFormat) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.uid, ti.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    ti.mtime = st.st_mtime_ns // 1_000_000_000
    headers = {"mtime": f"{st.st_mtime_ns // 1_000_000_000}.{st.st_mtime_ns % 1_000_000_000:09d}"}
    for attr in os.listxattr(full, follow_symlinks=False):
        if not fmt.is_internal_xattr(attr):
            value = os.getxattr(full, attr, follow_symlinks=False)
            headers["SCHILY.xattr." + attr] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = headers
    if stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(full)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        ti.type = tarfile.FIFOTYPE
    elif stat.S_ISREG(st.st_mode):
        ti.type, ti.size = tarfile.REGTYPE, st.st_size
    else:
        raise InvalidArgument(f"{full}: a socket cannot be stored in a layer diff")
    return ti


def _marker(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """An empty regular member (whiteout or opaque marker) carrying ``st``'s owner/time."""
    ti = tarfile.TarInfo(name)
    ti.mode, ti.uid, ti.gid, ti.mtime = 0o644, st.st_uid, st.st_gid, int(st.st_mtime)
    return ti


def _members(layer_dir: Path, fmt: WhiteoutFormat) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    """The tar members of ``layer_dir`` in order, with the file to read data from."""
    links: dict[tuple[int, int], str] = {}
    root_st = os.lstat(layer_dir)
    yield _tarinfo("./", str(layer_dir), root_st, fmt), None
    if fmt.is_opaque(str(layer_dir)):
        yield _marker(OCI_OPAQUE, root_st), None
    for rel_dir, name, full, st in _walk(layer_dir):
        arc = os.path.join(rel_dir, name)
        if fmt.is_bookkeeping(name) or (fmt.native_oci and name == OCI_OPAQUE):
            continue
        hidden = fmt.whiteout_target(rel_dir, name, st)
        if hidden is not None:
            yield _marker(os.path.join(rel_dir, OCI_WHITEOUT_PREFIX + hidden), st), None
            continue
        ti = _tarinfo(arc, full, st, fmt)
        key = (st.st_dev, st.st_ino)
        if not ti.isdir() and st.st_nlink > 1:
            if key in links:
                ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, links[key], 0
                yield ti, None
                continue
            links[key] = arc
        yield ti, full if ti.isreg() else None
        if ti.isdir() and fmt.is_opaque(full):
            yield _marker(os.path.join(arc, OCI_OPAQUE), st), None


_TAR_OPTIONS: dict[str, Any] = {"format": tarfile.PAX_FORMAT, "encoding": "utf-8", "errors": "surrogateescape"}


def write_layer_tar(layer_dir: Path, fmt: WhiteoutFormat, out: IO[bytes]) -> None:
    """Write ``layer_dir`` as an OCI layer tar: whiteouts as ``.wh.NAME``, opaque
    directories as their entry followed by ``DIR/.wh..wh..opq``, hard links once.

    Headers come from tarfile; file data goes from the file to ``out`` with sendfile(2)
    (no copy through Python). A file that shrinks while it is read is padded with zeros
    to the size its header announced, so the stream stays a valid tar."""
    out.flush()
    fd = out.fileno()
    written = 0
    for ti, data_path in _members(layer_dir, fmt):
        header = ti.tobuf(_TAR_OPTIONS["format"], _TAR_OPTIONS["encoding"], _TAR_OPTIONS["errors"])
        write_all(fd, header)
        written += len(header)
        if data_path is not None:
            written += send_file_data(fd, data_path, ti.size)
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    write_all(fd, bytes(end))


def diff_size(layer_dir: Path, fmt: WhiteoutFormat) -> int:
    """Length in bytes of the stream :func:`diff_stream` produces, without reading data."""
    block, record = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
    total = 0
    for ti, _ in _members(layer_dir, fmt):
        total += len(ti.tobuf(_TAR_OPTIONS["format"], _TAR_OPTIONS["encoding"], _TAR_OPTIONS["errors"]))
        if ti.isreg():
            total += -(-ti.size // block) * block
    total += 2 * block
    return -(-total // record) * record


def lookup(root: Path | None, rel: str) -> os.stat_result | None:
    """lstat of ``root/rel`` if every intermediate component is a real directory."""
    if root is None:
        return None
    path = str(root)
    parts = [p for p in rel.split("/") if p]
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return os.lstat(root) if not parts else st


def layer_changes(layer_dir: Path, below: Path | None, fmt: WhiteoutFormat) -> list[Change]:
    """Changes recorded in ``layer_dir`` against ``below`` (the parent's full view)."""
    found: list[Change] = []
    for rel_dir, name, full, st in _walk(layer_dir):
        if fmt.is_bookkeeping(name) or (fmt.native_oci and name == OCI_OPAQUE):
            continue
        hidden = fmt.whiteout_target(rel_dir, name, st)
        if hidden is not None:
            if lookup(below, os.path.join(rel_dir, hidden)) is not None:
                found.append(Change("/" + os.path.join(rel_dir, hidden), ChangeKind.DELETED))
            continue
        rel = os.path.join(rel_dir, name)
        lower = lookup(below, rel)
        found.append(Change("/" + rel, ChangeKind.ADDED if lower is None else ChangeKind.MODIFIED))
        if lower is not None and stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(lower.st_mode) and fmt.is_opaque(full):
            assert below is not None
            present = set(os.listdir(full))
            for child in sorted(os.listdir(os.path.join(below, rel))):
                if child not in present and fmt.existing_whiteout(full, child) is None:
                    found.append(Change("/" + os.path.join(rel, child), ChangeKind.DELETED))
    return sorted(found, key=lambda c: c.path)


def _clean(name: str) -> str:
    """A tar member name as a relative path inside the layer; '' is the root."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\0" in name:
        raise InvalidArgument(f"tar member {name!r} points outside the layer")
    return "/".join(parts)


class _Applier:
    """Applies one OCI layer tar onto a layer's diff dir (not mounted)."""

    def __init__(self, layer_dir: Path, below: Path | None, fmt: WhiteoutFormat) -> None:
        self.root, self.below, self.fmt = layer_dir, below, fmt
        self.dir_times: list[tuple[str, int]] = []
        self.written = 0

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    def ensure_dir(self, rel: str) -> None:
        """Make ``rel`` a real directory of the layer, copying metadata from below."""
        if not rel:
            return
        parent, _, name = rel.rpartition("/")
        self.ensure_dir(parent)
        path = self.path(rel)
        st = lookup(self.root, rel)
        if st is not None and stat.S_ISDIR(st.st_mode):
            return
        self.make_dir(parent, name, st)
        lower = lookup(self.below, rel)
        if lower is not None and stat.S_ISDIR(lower.st_mode):
            copy_metadata(os.path.join(str(self.below), rel), path, lower)

    def make_dir(self, parent: str, name: str, existing: os.stat_result | None) -> None:
        """Create a directory where the layer had ``existing`` (or nothing)."""
        rel = os.path.join(parent, name)
        path = self.path(rel)
        hidden = existing is not None or self.fmt.existing_whiteout(self.path(parent), name) is not None
        self.clear(parent, name)
        os.mkdir(path, 0o755)
        lower = lookup(self.below, rel)
        if hidden and lower is not None and stat.S_ISDIR(lower.st_mode):
            self.fmt.make_opaque(path)  # the lower directory stays deleted underneath

    def clear(self, parent: str, name: str) -> None:
        remove_path(Path(self.path(os.path.join(parent, name))))
        whiteout = self.fmt.existing_whiteout(self.path(parent), name)
        if whiteout is not None:
            os.unlink(whiteout)

    def member(self, tar: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        rel = _clean(ti.name)
        parent, _, name = rel.rpartition("/")
        if rel:
            self.ensure_dir(parent)
        if name == OCI_OPAQUE:
            self.fmt.make_opaque(self.path(parent))
            return
        if name.startswith(OCI_WHITEOUT_PREFIX):
            hidden = name[len(OCI_WHITEOUT_PREFIX):]
            self.clear(parent, hidden)
            if lookup(self.below, os.path.join(parent, hidden)) is not None:
                self.fmt.make_whiteout(self.path(parent), hidden)
            return
        path = self.path(rel)
        existing = lookup(self.root, rel) if rel else os.lstat(self.root)
        if ti.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self.make_dir(parent, name, existing)
            self.set_metadata(path, ti)
            self.dir_times.append((path, _mtime_ns(ti)))
            return
        self.clear(parent, name)
        if ti.islnk():
            self.link(_clean(ti.linkname), path)
            return
        if ti.isreg():
            source = tar.extractfile(ti)
            assert source is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            self.written += ti.size
        elif ti.issym():
            os.symlink(ti.linkname, path)
        elif ti.ischr() or ti.isblk() or ti.isfifo():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK if ti.isblk() else stat.S_IFIFO
            os.mknod(path, kind | 0o600, os.makedev(ti.devmajor, ti.devminor))
        else:
            raise InvalidArgument(f"tar member {ti.name!r} has unsupported type {ti.type!r}")
        self.set_metadata(path, ti)
        os.utime(path, ns=(_mtime_ns(ti), _mtime_ns(ti)), follow_symlinks=False)

    def link(self, target_rel: str, path: str) -> None:
        """A hard link; a target that only exists below is copied up first."""
        target = self.path(target_rel)
        st = lookup(self.root, target_rel)
        if st is None:
            lower = lookup(self.below, target_rel)
            if lower is None or stat.S_ISDIR(lower.st_mode):
                raise InvalidArgument(f"hard link to {target_rel!r}, which is not in the layer or below it")
            assert self.below is not None
            parent = target_rel.rpartition("/")[0]
            self.ensure_dir(parent)
            source = os.path.join(str(self.below), target_rel)
            if stat.S_ISREG(lower.st_mode):
                copy_file(source, target, lower)
            elif stat.S_ISLNK(lower.st_mode):
                os.symlink(os.readlink(source), target)
            else:
                os.mknod(target, lower.st_mode, lower.st_rdev)
            copy_metadata(source, target, lower)
        elif stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"hard link to directory {target_rel!r}")
        os.link(target, path, follow_symlinks=False)

    def set_metadata(self, path: str, ti: tarfile.TarInfo) -> None:
        os.chown(path, ti.uid, ti.gid, follow_symlinks=False)
        if not ti.issym():
            os.chmod(path, ti.mode & 0o7777)
        wanted = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                  for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        for attr in os.listxattr(path, follow_symlinks=False):
            if attr not in wanted and not self.fmt.is_internal_xattr(attr):
                os.removexattr(path, attr, follow_symlinks=False)
        for attr, value in wanted.items():
            if self.fmt.is_internal_xattr(attr):
                continue  # never let a tar forge the filesystem's own bookkeeping
            os.setxattr(path, attr, value, follow_symlinks=False)

    def finish(self) -> int:
        for path, mtime in reversed(self.dir_times):
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        return self.written


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    raw = ti.pax_headers.get("mtime")
    if raw is not None:
        sec, _, frac = raw.partition(".")
        return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or 0) * (-1 if sec.startswith("-") else 1)
    return int(ti.mtime * 1_000_000_000)


def apply_layer_tar(layer_dir: Path, below: Path | None, fmt: WhiteoutFormat, stream: IO[bytes]) -> int:
    """Apply an OCI layer tar onto ``layer_dir`` whose parent's full view is ``below``;
    return the bytes of file data written. Whiteouts are written only where something
    below exists (an unneeded whiteout would show up in a directory overlay does not merge)."""
    applier = _Applier(layer_dir, below, fmt)
    try:
        with tarfile.open(fileobj=stream, mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
            for ti in tar:
                applier.member(tar, ti)
    except tarfile.TarError as exc:
        raise InvalidArgument(f"not a readable layer tar: {exc}") from exc
    return applier.finish()
