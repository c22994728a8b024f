"""OCI image-layer tar streams: writing entries and applying them onto a directory.

Format (OCI image spec, "layer changesets"): an uncompressed POSIX tar in PAX format.

* A deleted path ``dir/name`` is the empty regular file ``dir/.wh.name`` (a *whiteout*).
* A directory whose lower content is hidden entirely carries ``dir/.wh..wh..opq``
  (an *opaque* marker), written right after the directory's own entry.
* Other ``.wh..wh.*`` names are reserved (aufs metadata) and ignored when applying.

What an entry carries: type (file, dir, symlink, hard link, char/block device, fifo),
mode with setuid/setgid/sticky, numeric uid/gid, mtime to the nanosecond (PAX
``mtime`` as ``seconds.nanoseconds``), xattrs as PAX ``SCHILY.xattr.<name>`` (binary
values kept byte for byte), hard links as tar link entries naming the first path of the
inode written in the same stream. Sockets cannot be stored in tar and are skipped.

API used by the naive differ and by drivers with a native diff (overlay):

* :class:`LayerTarWriter` — ``add(fs_path, arcname)``, ``add_whiteout(arcname)``,
  ``add_opaque(dir_arcname)``; a context manager that finishes the stream on exit.
* :class:`LayerTarApplier` — applies members onto a root directory; it refuses names
  that leave the root (absolute, ``..``) or pass through a symlink, honours whiteouts
  and opaque markers (subclasses override :meth:`LayerTarApplier.whiteout` /
  :meth:`LayerTarApplier.opaque` to store them natively, e.g. as overlay whiteouts),
  and sets directory mtimes last. :func:`apply_tar` runs it over a whole stream.
* :func:`classify` — what a member name means (entry / whiteout / opaque / reserved).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import IO

from csi.errors import InvalidArgument
from csi.host.pipestream import send_file_data, write_all
from csi.host.treecopy import remove_tree

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PREFIX = "SCHILY.xattr."
_PRIVATE_XATTRS = ("trusted.overlay.",)  # a driver's own bookkeeping, never layer content
_COPY_CHUNK = 1 << 20
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class MemberKind(str, Enum):
    ENTRY = "entry"
    WHITEOUT = "whiteout"  # path = the deleted path
    OPAQUE = "opaque"  # path = the opaque directory ("" for the root)
    RESERVED = "reserved"  # other .wh..wh. metadata: ignored


@dataclass(frozen=True)
class MemberName:
    kind: MemberKind
    path: str  # normalised, relative, no trailing slash; "" is the root


def normalise(name: str) -> str:
    """A member name as a clean relative path, or InvalidArgument if it leaves the root."""
    if "\x00" in name:
        raise InvalidArgument(f"tar member name {name!r} contains NUL")
    if name.startswith("/"):
        raise InvalidArgument(f"tar member {name!r} is absolute: layer tars hold relative paths")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"tar member {name!r} leaves the layer (contains '..')")
    return "/".join(parts)


def classify(name: str) -> MemberName:
    """What a member name means (see module docstring)."""
    path = normalise(name)
    pure = PurePosixPath(path)
    base, parent = pure.name, str(pure.parent) if str(pure.parent) != "." else ""
    if base == OPAQUE_MARKER:
        return MemberName(MemberKind.OPAQUE, parent)
    if base.startswith(WHITEOUT_META_PREFIX):
        return MemberName(MemberKind.RESERVED, path)
    if base.startswith(WHITEOUT_PREFIX):
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise InvalidArgument(f"tar member {name!r} is a malformed whiteout")
        return MemberName(MemberKind.WHITEOUT, f"{parent}/{target}" if parent else target)
    return MemberName(MemberKind.ENTRY, path)


def whiteout_name(path: str) -> str:
    pure = PurePosixPath(path)
    parent = str(pure.parent)
    return f"{WHITEOUT_PREFIX}{pure.name}" if parent == "." else f"{parent}/{WHITEOUT_PREFIX}{pure.name}"


def opaque_name(dir_path: str) -> str:
    return f"{dir_path}/{OPAQUE_MARKER}" if dir_path else OPAQUE_MARKER


def format_ns(ns: int) -> str:
    """Nanoseconds as the exact decimal PAX time ``seconds.nnnnnnnnn``."""
    sign, value = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{value // 10**9}.{value % 10**9:09d}"


def parse_ns(member: tarfile.TarInfo) -> int:
    """A member's mtime in nanoseconds, exact when the PAX header carries it."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        return int(Decimal(text) * 10**9)
    return int(member.mtime) * 10**9


def read_xattrs(path: Path) -> dict[str, bytes]:
    """The xattrs of ``path`` (not following symlinks), without drivers' private ones."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
            if not n.startswith(_PRIVATE_XATTRS)}


def tarinfo_for(fs_path: Path, arcname: str, st: os.stat_result) -> tarfile.TarInfo | None:
    """A PAX TarInfo describing ``fs_path`` (None for sockets, which tar cannot hold)."""
    mode = st.st_mode
    info = tarfile.TarInfo(arcname + "/" if stat.S_ISDIR(mode) and arcname else arcname)
    if stat.S_ISREG(mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(fs_path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None
    info.mode = stat.S_IMODE(mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns // 10**9
    if st.st_mtime_ns % 10**9 or st.st_mtime_ns < 0:
        info.pax_headers["mtime"] = format_ns(st.st_mtime_ns)
    for name, value in read_xattrs(fs_path).items():
        info.pax_headers[XATTR_PREFIX + name] = value.decode(_ENCODING, _ERRORS)
    return info


def _raw_fileno(fileobj: IO[bytes]) -> int | None:
    """The descriptor behind ``fileobj`` (a pipe, a regular file) to send file data to
    directly, or None for in-memory sinks."""
    try:
        return fileobj.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


class LayerTarWriter:
    """Writes an OCI layer tar to ``fileobj`` (see module docstring)."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT,
                                 encoding=_ENCODING, errors=_ERRORS)
        self._inodes: dict[tuple[int, int], str] = {}
        self.content_bytes = 0
        self._fileobj = fileobj
        self._fd = _raw_fileno(fileobj)

    def __enter__(self) -> LayerTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._tar.close()

    def add(self, fs_path: Path, arcname: str, st: os.stat_result | None = None) -> None:
        """Write ``fs_path`` as member ``arcname``; a second path of an inode already
        written becomes a hard-link entry."""
        st = st or os.lstat(fs_path)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = self._inodes.get((st.st_dev, st.st_ino))
            if first is not None:
                link = tarfile.TarInfo(arcname)
                link.type, link.linkname = tarfile.LNKTYPE, first
                link.mode, link.uid, link.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
                link.mtime, link.uname, link.gname = st.st_mtime_ns // 10**9, "", ""
                self._tar.addfile(link)
                return
            self._inodes[(st.st_dev, st.st_ino)] = arcname
        info = tarinfo_for(fs_path, arcname, st)
        if info is None:
            return
        if info.type == tarfile.REGTYPE:
            self.content_bytes += info.size
            if self._fd is None:
                with open(fs_path, "rb") as f:
                    self._tar.addfile(info, f)
            else:  # header through tarfile's encoder, data with sendfile(2): no copy through Python
                header = info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)
                self._fileobj.flush()  # what tarfile wrote through the file object goes first
                write_all(self._fd, header)
                self._tar.offset += len(header) + send_file_data(self._fd, fs_path, info.size)
        else:
            self._tar.addfile(info)

    def _marker(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = tarfile.REGTYPE, 0o600, 0, 0
        self._tar.addfile(info)

    def add_whiteout(self, deleted_path: str) -> None:
        self._marker(whiteout_name(deleted_path))

    def add_opaque(self, dir_path: str) -> None:
        self._marker(opaque_name(dir_path))


class LayerTarApplier:
    """Applies OCI layer tar members onto ``root`` (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.bytes_written = 0
        self._unpacked: set[str] = set()
        self._checked_dirs: set[str] = set()
        self._dir_times: list[tuple[str, int]] = []

    # -- path safety

    def _resolve(self, rel: str, *, make_parents: bool = True) -> Path:
        """``root/rel`` after checking that no ancestor is a symlink or a non-directory.
        Directories already checked are remembered until something is removed."""
        unchecked: list[str] = []
        ancestor = rel.rpartition("/")[0]
        while ancestor and ancestor not in self._checked_dirs:
            unchecked.append(ancestor)
            ancestor = ancestor.rpartition("/")[0]
        for prefix in reversed(unchecked):  # outermost first
            current = self.root / prefix
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                if not make_parents:
                    return self.root / rel
                os.mkdir(current, 0o755)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    name = prefix.rpartition("/")[2]
                    raise InvalidArgument(f"tar member {rel!r} passes through {name!r}, which is not a directory")
            self._checked_dirs.add(prefix)
        return self.root / rel

    def _remove(self, path: Path) -> None:
        self._checked_dirs.clear()  # a checked directory may be gone or replaced now
        _remove(path)

    # -- storing deletions (overridable)

    def whiteout(self, rel: str) -> None:
        """Delete ``rel`` (hide it from the lower layers). An override that deletes
        anything must do it through :meth:`_remove` (it resets the directory checks)."""
        self._remove(self._resolve(rel, make_parents=False))

    def opaque(self, rel: str) -> None:
        """Hide everything the lower layers hold in directory ``rel``."""
        directory = self._resolve(rel + "/x", make_parents=False).parent if rel else self.root
        if not directory.is_dir() or directory.is_symlink():
            return
        for name in os.listdir(directory):
            child = f"{rel}/{name}" if rel else name
            if child not in self._unpacked:
                self._remove(directory / name)

    # -- applying

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        meaning = classify(member.name)
        if meaning.kind is MemberKind.WHITEOUT:
            self.whiteout(meaning.path)
            return
        if meaning.kind is MemberKind.OPAQUE:
            self.opaque(meaning.path)
            return
        if meaning.kind is MemberKind.RESERVED or not meaning.path:
            return
        rel = meaning.path
        path = self._resolve(rel)
        existing = _lstat(path)
        if existing is not None and not (stat.S_ISDIR(existing.st_mode) and member.isdir()):
            self._remove(path)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(path, 0o700)
            self._checked_dirs.add(rel)  # a real directory now
        elif member.isreg():
            self._write_file(tar, member, path)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target = self._resolve(normalise(member.linkname), make_parents=False)
            if _lstat(target) is None:
                raise InvalidArgument(f"tar member {rel!r} links to {member.linkname!r}, which does not exist")
            os.link(target, path, follow_symlinks=False)
            self._unpacked.add(rel)
            return  # shares the target's inode and metadata
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, 0o600)
        else:
            raise InvalidArgument(f"tar member {rel!r} has unsupported type {member.type!r}")
        self._unpacked.add(rel)
        self._set_metadata(path, member, replace_xattrs=existing is not None)
        if member.isdir():
            self._dir_times.append((rel, parse_ns(member)))

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
        source = tar.extractfile(member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                shutil.copyfileobj(source, out, _COPY_CHUNK)
        self.bytes_written += member.size

    def _set_metadata(self, path: Path, member: tarfile.TarInfo, *, replace_xattrs: bool) -> None:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
        wanted = {k[len(XATTR_PREFIX):]: v.encode(_ENCODING, _ERRORS)
                  for k, v in member.pax_headers.items() if k.startswith(XATTR_PREFIX)}
        if replace_xattrs:
            for name in read_xattrs(path):
                if name not in wanted:
                    os.removexattr(path, name, follow_symlinks=False)
        for name, value in wanted.items():
            os.setxattr(path, name, value, follow_symlinks=False)
        if not member.isdir():
            ns = parse_ns(member)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def finish(self) -> int:
        """Set directory mtimes (deepest first); returns the content bytes written."""
        for rel, ns in sorted(self._dir_times, key=lambda item: item[0].count("/"), reverse=True):
            path = self.root / rel
            if _lstat(path) is not None:
                os.utime(path, ns=(ns, ns), follow_symlinks=False)
        self._dir_times.clear()
        return self.bytes_written


def apply_tar(root: Path, stream: IO[bytes], applier: LayerTarApplier | None = None) -> int:
    """Apply a whole OCI layer tar onto ``root``; returns the content bytes written."""
    applier = applier or LayerTarApplier(root)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", encoding=_ENCODING, errors=_ERRORS)
    except tarfile.TarError as exc:
        raise InvalidArgument(f"not a tar stream: {exc}") from exc
    with tar:
        try:
            for member in tar:
                applier.apply(tar, member)
        except tarfile.TarError as exc:
            raise InvalidArgument(f"malformed layer tar: {exc}") from exc
    return applier.finish()


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)
