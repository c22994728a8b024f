"""The one OCI layer tar codec: every differ writes and applies layer tars through it.

Format (OCI image spec, "layer changesets"): an uncompressed POSIX tar in PAX format;
whiteouts and opaque markers as named in :mod:`csi.graphdriver.diff.whiteouts`.

What an entry carries: type (file, dir, symlink, hard link, char/block device, fifo),
mode with setuid/setgid/sticky, numeric uid/gid, mtime to the nanosecond, xattrs as PAX
``SCHILY.xattr.<name>`` (binary values kept byte for byte; a filesystem's private ones,
``trusted.overlay.*``, never), hard links as tar link entries naming the first path of
the inode written in the same stream. Sockets cannot be stored in tar and are skipped.
Names that are not UTF-8 keep their bytes (PAX ``hdrcharset=BINARY``).

Sparse files: a regular file with holes (found with ``SEEK_DATA``/``SEEK_HOLE``: its data
extents add up to less than its size) is written in GNU's **PAX sparse format 1.0** — PAX
records ``GNU.sparse.major=1``, ``GNU.sparse.minor=0``, ``GNU.sparse.name`` (the real name),
``GNU.sparse.realsize``; the ustar name is the placeholder ``GNUSparseFile.0/<base name>``; the
member's data is the map (decimal ``count`` then ``offset``/``length`` pairs, one per line,
padded to a block) followed by the data segments back to back, and a file ending in a hole
ends its map with ``(size, 0)`` (what GNU tar needs to set the size). It is the one sparse
encoding every reader here takes: GNU tar, Go's archive/tar (umoci, containerd, skopeo) and
Python's tarfile; GNU's old ``S`` type header is read by tarfile and GNU tar but Go hands it to
unpackers as type ``S``, which umoci and containerd refuse. A dense file stays a plain entry.
Data segments go by sendfile(2) from their offsets. The map comes from the filesystem's
extents, so the bytes are deterministic for an unchanged file (a frozen layer). A file with
8 GiB of data or more is written dense (:data:`SPARSE_DATA_MAX`).

Times: one formatter, :func:`format_ns`, writes the PAX ``mtime`` as the exact decimal
of the nanoseconds (``-0.000000001`` for -1 ns: a reader adds the fraction with the
sign), whenever the time is not a whole non-negative second; :func:`parse_ns` reads it
back exactly. Sizes past the ustar field (8 GiB) go to a PAX ``size`` record.

Writing (:class:`LayerTarWriter`): ``add(fs_path, arcname)``, ``add_whiteout(path)``,
``add_opaque(dir_path)``; a context manager that ends the archive on exit. Headers come
from tarfile's encoder; file data goes to a real file descriptor with sendfile(2) (no
copy through Python), padded to the announced size if the file shrank meanwhile. A
:class:`TarSizer` sink counts the stream's bytes without reading any file data (what a
``diff_size`` needs; a sparse file's extents are looked up, not read).

Applying (:class:`LayerTarApplier`, :func:`apply_tar`): members onto a root directory.
It refuses names that leave the root (absolute, ``..``) or pass through a symlink or any
other non-directory, never follows a symlink, honours whiteouts and opaque markers, and
sets directory mtimes last (deepest first). A sparse member (any encoding tarfile reads:
PAX 0.0/0.1/1.0, old GNU) gets its data segments written at their offsets and the file
truncated to its size: the holes stay unallocated. Its map is checked first (ascending,
non-overlapping, inside the size, no more data than the member carries). What it applied is
durable when :func:`apply_tar` returns: a file of ``DIRECT_MIN`` bytes or more is written with
``O_DIRECT`` from a page-aligned buffer (its last partial block buffered) where the file system
takes it — the data goes to the disk as it arrives, past the page cache, so a large restore does
not wait on the cache's writeback (on this VM's disk, ad hoc and not by the bench, 1 GiB took
0.6 s direct and 0.3-3.5 s buffered with the writeback started per file); a smaller file's writeback starts as soon as it is
written; and :meth:`~LayerTarApplier.finish` fsyncs every file written and every directory the tar created,
changed or deleted from (one journal commit covers the entries' metadata; a restore acknowledges
a volume on imported layers, so they must survive a power cut). A layer store with its own on-disk form of
deletions (an overlay upper dir) subclasses it and overrides the hooks
:meth:`~LayerTarApplier.whiteout`, :meth:`~LayerTarApplier.opaque`,
:meth:`~LayerTarApplier.clear`, :meth:`~LayerTarApplier.make_dir`,
:meth:`~LayerTarApplier.implied_dir`, :meth:`~LayerTarApplier.is_absent` and
:meth:`~LayerTarApplier.link_source`.
"""

from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
import stat
import tarfile
from decimal import Decimal
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from csi.errors import InvalidArgument
from csi.graphdriver.diff.whiteouts import MemberKind, classify, is_private_xattr, normalise, opaque_name, whiteout_name
from csi.host.fsinfo import fsync_path
from csi.host.pipestream import send_file_data, write_all
from csi.host.treecopy import remove_tree

XATTR_PREFIX = "SCHILY.xattr."
_COPY_CHUNK = 1 << 20
DIRECT_MIN = 1 << 20  # files at least this large are written with O_DIRECT where possible
_BLOCK = 4096  # O_DIRECT's alignment of memory, offsets and lengths (the largest common one)
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
_NS = 10**9
SPARSE_DIR = "GNUSparseFile.0"
# A sparse member whose stored data would need a PAX ``size`` record (8 GiB and more) is written
# dense: Python's tarfile then takes that record for the real size and misplaces the next header.
SPARSE_DATA_MAX = 8**11 - 1 - (1 << 20)
_SPARSE_NAME_MAX = 80


def format_ns(ns: int) -> str:
    """Nanoseconds as the exact decimal PAX time ``[-]seconds.nnnnnnnnn``."""
    sign, value = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{value // _NS}.{value % _NS:09d}"


def parse_ns(member: tarfile.TarInfo) -> int:
    """A member's mtime in nanoseconds, exact when the PAX header carries it."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        return int(Decimal(text) * _NS)
    return int(member.mtime) * _NS


def set_mtime(info: tarfile.TarInfo, ns: int) -> None:
    """Give ``info`` the mtime ``ns``: the ustar field, and a PAX record unless exact there."""
    info.mtime = ns // _NS
    if ns % _NS or ns < 0:
        info.pax_headers["mtime"] = format_ns(ns)


def read_xattrs(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The xattrs of ``path`` (not following symlinks), without private ones."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names) if not is_private_xattr(n)}


def tarinfo_for(fs_path: str | os.PathLike[str], arcname: str, st: os.stat_result) -> tarfile.TarInfo | None:
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
    set_mtime(info, st.st_mtime_ns)
    for name, value in read_xattrs(fs_path).items():
        info.pax_headers[XATTR_PREFIX + name] = value.decode(_ENCODING, _ERRORS)
    return info


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each data extent of ``fd`` below ``size``."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole is left
                return
            raise
        if start >= size or end <= start:
            return
        offset = min(end, size)
        yield start, offset - start


def data_segments(path: str | os.PathLike[str], size: int) -> list[tuple[int, int]] | None:
    """``[(offset, length)]`` of the data extents of the regular file ``path`` when it has
    holes (the extents add up to less than ``size``); None for a dense file or a filesystem
    without ``SEEK_DATA``. (csi.host.treecopy.copy_sparse walks extents the same way, to copy.)"""
    if size == 0:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        segments = list(_extents(fd, size))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        os.close(fd)
    return segments if sum(length for _, length in segments) < size else None


def sparse_map(segments: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The map a sparse member carries: the data segments, plus ``(size, 0)`` when the file
    ends in a hole."""
    last = segments[-1][0] + segments[-1][1] if segments else 0
    return segments + [(size, 0)] if last < size else list(segments)


def _sparse_map_bytes(entries: list[tuple[int, int]]) -> bytes:
    text = f"{len(entries)}\n" + "".join(f"{offset}\n{length}\n" for offset, length in entries)
    return text.encode("ascii").ljust(_padded(len(text)), b"\0")


def make_sparse(info: tarfile.TarInfo, entries: list[tuple[int, int]]) -> bytes:
    """Turn the regular-file ``info`` into a PAX 1.0 sparse member with map ``entries``;
    returns the map block(s) that start its data."""
    name = info.name
    base = name.rpartition("/")[2]
    if not base.isascii() or len(base) > _SPARSE_NAME_MAX or not base.isprintable():
        base = "file"
    info.pax_headers.update({
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(info.size),
    })
    info.name = f"{SPARSE_DIR}/{base}"
    head = _sparse_map_bytes(entries)
    info.size = len(head) + sum(length for _, length in entries)
    return head


def header_bytes(info: tarfile.TarInfo) -> bytes:
    """The header block(s) of ``info`` as this codec writes them (PAX, UTF-8, binary names kept)."""
    return info.tobuf(tarfile.PAX_FORMAT, _ENCODING, _ERRORS)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class TarSizer:
    """A sink that counts the bytes of a tar without reading file data."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)


def _raw_fileno(fileobj: IO[bytes]) -> int | None:
    """The descriptor behind ``fileobj`` (a pipe, a regular file) to send file data to
    directly, or None for in-memory sinks."""
    try:
        return fileobj.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


class LayerTarWriter:
    """Writes an OCI layer tar to ``out`` (see module docstring)."""

    def __init__(self, out: IO[bytes] | TarSizer) -> None:
        self._out = out
        self._sizer = out if isinstance(out, TarSizer) else None
        self._fd = None if self._sizer is not None else _raw_fileno(out)  # type: ignore[arg-type]
        if self._fd is not None:
            out.flush()  # type: ignore[union-attr]  # what was written through the object goes first
        self._inodes: dict[tuple[int, int], str] = {}
        self._written = 0
        self._closed = False
        self.content_bytes = 0

    def __enter__(self) -> LayerTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the archive: two zero blocks, then zeros to a whole tar record."""
        if self._closed:
            return
        self._closed = True
        end = 2 * tarfile.BLOCKSIZE
        end += -(self._written + end) % tarfile.RECORDSIZE
        self._emit(bytes(end))

    def _emit(self, data: bytes) -> None:
        if self._fd is not None:
            write_all(self._fd, data)
        else:
            self._out.write(data)
        self._written += len(data)

    def _data(self, path: str | os.PathLike[str], size: int) -> None:
        """``size`` bytes of ``path`` padded to a block (zeros where the file shrank)."""
        if self._sizer is not None:
            self._sizer.count += _padded(size)
            self._written += _padded(size)
        elif self._fd is not None:
            self._written += send_file_data(self._fd, path, size)
        else:
            left = size
            with open(path, "rb") as source:
                while left:
                    chunk = source.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        break
                    self._emit(chunk)
                    left -= len(chunk)
            self._emit(bytes(left + _padded(size) - size))

    def _segments(self, path: str | os.PathLike[str], entries: list[tuple[int, int]], stored: int) -> None:
        """The data segments ``entries`` of ``path`` back to back, then padding of the member's
        ``stored`` bytes (the map block already written) to a block."""
        data = sum(length for _, length in entries)
        if self._sizer is not None:
            self._sizer.count += _padded(stored) - (stored - data)
            self._written += _padded(stored) - (stored - data)
            return
        source = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for offset, length in entries:
                done = 0
                while done < length:
                    if self._fd is not None:
                        n = os.sendfile(self._fd, source, offset + done, min(length - done, 1 << 30))
                        self._written += n
                    else:
                        chunk = os.pread(source, min(length - done, _COPY_CHUNK), offset + done)
                        n = len(chunk)
                        if n:
                            self._emit(chunk)
                    if n == 0:  # the file shrank: zeros keep the announced size
                        self._emit(bytes(length - done))
                        break
                    done += n
        finally:
            os.close(source)
        self._emit(bytes(_padded(stored) - stored))

    def add_info(self, info: tarfile.TarInfo) -> None:
        """Write a member without data (anything but a regular file with content)."""
        self._emit(header_bytes(info))

    def add(self, fs_path: str | os.PathLike[str], arcname: str, st: os.stat_result | None = None) -> None:
        """Write ``fs_path`` as member ``arcname``; a second path of an inode already
        written becomes a hard-link entry."""
        st = st or os.lstat(fs_path)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = self._inodes.get((st.st_dev, st.st_ino))
            if first is not None:
                link = tarfile.TarInfo(arcname)
                link.type, link.linkname = tarfile.LNKTYPE, first
                link.mode, link.uid, link.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
                link.uname = link.gname = ""
                set_mtime(link, st.st_mtime_ns)
                self.add_info(link)
                return
            self._inodes[(st.st_dev, st.st_ino)] = arcname
        info = tarinfo_for(fs_path, arcname, st)
        if info is None:
            return
        segments = data_segments(fs_path, info.size) if info.type == tarfile.REGTYPE and info.size else None
        if segments is not None and sum(length for _, length in segments) >= SPARSE_DATA_MAX:
            segments = None  # see SPARSE_DATA_MAX
        if segments is not None:
            self.content_bytes += info.size
            entries = sparse_map(segments, info.size)
            head = make_sparse(info, entries)
            self.add_info(info)
            self._emit(head)
            self._segments(fs_path, entries, info.size)
            return
        self.add_info(info)
        if info.type == tarfile.REGTYPE and info.size:
            self.content_bytes += info.size
            self._data(fs_path, info.size)

    def _marker(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = tarfile.REGTYPE, 0o600, 0, 0
        self.add_info(info)

    def add_whiteout(self, deleted_path: str) -> None:
        self._marker(whiteout_name(deleted_path))

    def add_opaque(self, dir_path: str) -> None:
        self._marker(opaque_name(dir_path))


class LayerTarApplier:
    """Applies OCI layer tar members onto ``root`` (see module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.bytes_written = 0
        self._unpacked: set[str] = set()
        self._checked_dirs: set[str] = set()
        self._dir_times: list[tuple[str, int]] = []
        self._chunk: memoryview | None = None
        self._aligned: memoryview | None = None  # page-aligned, for O_DIRECT writes
        self._direct = True  # False once the file system refused O_DIRECT
        self._written: list[Path] = []  # files whose data finish() fsyncs
        self._touched: set[str] = {""}  # directories (relative) whose entries or metadata changed

    def path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    # -- path safety

    def resolve(self, rel: str, *, make_parents: bool = True) -> Path:
        """``root/rel`` after checking that every ancestor is a real directory (a missing
        one is made with :meth:`implied_dir`, or, without ``make_parents``, the path is
        returned as it is: nothing can exist there). Checked directories are remembered
        until something is removed."""
        unchecked: list[str] = []
        ancestor = rel.rpartition("/")[0]
        while ancestor and ancestor not in self._checked_dirs:
            unchecked.append(ancestor)
            ancestor = ancestor.rpartition("/")[0]
        for prefix in reversed(unchecked):  # outermost first
            st = lstat_or_none(self.root / prefix)
            if st is None or self.is_absent(prefix, st):
                if not make_parents:
                    return self.root / rel
                self.implied_dir(prefix, st)
            elif not stat.S_ISDIR(st.st_mode):
                name = prefix.rpartition("/")[2]
                raise InvalidArgument(f"tar member {rel!r} passes through {name!r}, which is not a directory")
            self._checked_dirs.add(prefix)
        return self.path(rel)

    def _remove(self, path: Path) -> None:
        self._checked_dirs.clear()  # a checked directory may be gone or replaced now
        remove_tree(path)

    # -- hooks: how this root stores things (overridable)

    def is_absent(self, rel: str, st: os.stat_result) -> bool:
        """Whether what lies at ``rel`` (an ancestor of a member) counts as nothing."""
        return False

    def implied_dir(self, rel: str, existing: os.stat_result | None) -> None:
        """Make the directory ``rel`` that a member needs and the tar did not name."""
        os.mkdir(self.path(rel), 0o755)

    def make_dir(self, rel: str, existing: os.stat_result | None) -> None:
        """Make the directory entry ``rel`` where ``existing`` (not a directory) or nothing is."""
        self.clear(rel, existing)
        os.mkdir(self.path(rel), 0o700)

    def clear(self, rel: str, existing: os.stat_result | None) -> None:
        """Make room at ``rel`` (ancestors already checked), where ``existing`` lies."""
        if existing is not None:
            self._remove(self.path(rel))

    def whiteout(self, rel: str) -> None:
        """Delete ``rel`` (hide it from the lower layers). An override that deletes
        anything must do it through :meth:`clear` or :meth:`_remove` (they reset the
        directory checks)."""
        self.clear(rel, lstat_or_none(self.resolve(rel, make_parents=False)))

    def opaque(self, rel: str) -> None:
        """Hide everything the lower layers hold in directory ``rel``: here, whatever
        this tar did not unpack into it."""
        directory = self.resolve(rel + "/x", make_parents=False).parent if rel else self.root
        if not directory.is_dir() or directory.is_symlink():
            return
        for name in os.listdir(directory):
            child = f"{rel}/{name}" if rel else name
            if child not in self._unpacked:
                self._remove(directory / name)

    def link_source(self, rel: str) -> Path:
        """The existing inode a hard-link member ``rel`` names (never a directory)."""
        target = self.resolve(rel, make_parents=False)
        st = lstat_or_none(target)
        if st is None:
            raise InvalidArgument(f"a hard link names {rel!r}, which does not exist")
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"a hard link names the directory {rel!r}")
        return target

    # -- applying

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        meaning = classify(member.name)
        self._touched.add(meaning.path.rpartition("/")[0])
        if member.isdir() and meaning.kind is MemberKind.ENTRY:
            self._touched.add(meaning.path)
        if meaning.kind is MemberKind.WHITEOUT:
            self.whiteout(meaning.path)
            return
        if meaning.kind is MemberKind.OPAQUE:
            self.opaque(meaning.path)
            return
        if meaning.kind is MemberKind.RESERVED:
            return
        rel = meaning.path
        if not rel:  # the root's own entry: its metadata only
            if member.isdir():
                self._set_metadata(self.root, member, replace_xattrs=True)
                self._dir_times.append(("", parse_ns(member)))
            return
        path = self.resolve(rel)
        existing = lstat_or_none(path)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self.make_dir(rel, existing)
            self._checked_dirs.add(rel)  # a real directory now
        else:
            self.clear(rel, existing)
            if member.isreg():
                self._write_file(tar, member, path)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                os.link(self.link_source(normalise(member.linkname)), path, follow_symlinks=False)
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
        if member.sparse is not None:
            self._write_sparse(tar, member, path)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if member.size >= DIRECT_MIN and self._direct and self._copy_direct(tar, member, fd):
                pass
            elif member.size:
                self._copy_data(tar, member, fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # starts the writeback; finish() waits
        finally:
            os.close(fd)
        self._written.append(path)
        self.bytes_written += member.size

    def _copy_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        """The member's data from the tar stream to ``fd``, in large reads into one reused buffer."""
        assert tar.fileobj is not None
        source = tar.fileobj
        source.seek(member.offset_data)
        if self._chunk is None:
            self._chunk = memoryview(bytearray(_COPY_CHUNK))
        left = member.size
        while left:
            n = source.readinto(self._chunk[:min(left, _COPY_CHUNK)])  # type: ignore[attr-defined]
            if not n:
                raise InvalidArgument(f"tar member {member.name!r} ends inside its data")
            write_all(fd, self._chunk[:n])
            left -= n

    def _copy_direct(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> bool:
        """The member's data to ``fd`` with O_DIRECT in whole blocks, the last partial block
        buffered; False (nothing written) when the file system refuses O_DIRECT."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            self._direct = False
            return False
        assert tar.fileobj is not None
        source = tar.fileobj
        source.seek(member.offset_data)
        if self._aligned is None:
            self._aligned = memoryview(mmap.mmap(-1, _COPY_CHUNK))  # mmap memory is page-aligned
        buf, left, direct, at = self._aligned, member.size, True, 0
        while left:
            want, got = min(left, _COPY_CHUNK), 0
            while got < want:  # a whole buffer, so every direct write is whole blocks
                n = source.readinto(buf[got:want])  # type: ignore[attr-defined]
                if not n:
                    raise InvalidArgument(f"tar member {member.name!r} ends inside its data")
                got += n
            whole = want - want % _BLOCK if direct else 0
            if whole:
                try:
                    write_all(fd, buf[:whole])
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct = False  # this file system takes the flag but not the writes
                    os.lseek(fd, at, os.SEEK_SET)  # the chunk again, buffered, from its start
                    whole = 0
            if whole < want:
                if direct:
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # the tail is not a whole block
                    direct = False
                write_all(fd, buf[whole:want])
            left -= want
            at += want
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True

    def _write_sparse(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
        """The data segments at their offsets, then the size: holes stay unallocated."""
        size = _sparse_size(member)
        entries = _checked_map(member, size)
        carried = tar.offset - member.offset_data  # where the next header starts
        if sum(length for _, length in entries) > carried:
            raise InvalidArgument(f"tar member {member.name!r}: its sparse map names more data than it carries")
        assert tar.fileobj is not None
        tar.fileobj.seek(member.offset_data)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            for offset, length in entries:
                done = 0
                while done < length:
                    chunk = tar.fileobj.read(min(length - done, _COPY_CHUNK))
                    if not chunk:
                        raise InvalidArgument(f"tar member {member.name!r} ends inside its sparse data")
                    written = 0
                    while written < len(chunk):
                        written += os.pwrite(fd, chunk[written:], offset + done + written)
                    done += len(chunk)
            os.ftruncate(fd, size)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):
                raise InvalidArgument(f"tar member {member.name!r}: sparse size {size} is impossible here: {exc}") from exc
            raise
        finally:
            os.close(fd)
        self._written.append(path)
        self.bytes_written += size

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
            if not is_private_xattr(name):  # a tar never forges a filesystem's bookkeeping
                os.setxattr(path, name, value, follow_symlinks=False)
        if not member.isdir():
            ns = parse_ns(member)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def keep_dir_time(self, rel: str, ns: int) -> None:
        """Set ``rel``'s mtime to ``ns`` when the tar is done (unless its entry comes later)."""
        self._dir_times.append((rel, ns))

    def finish(self) -> int:
        """Set directory mtimes (deepest first, the tar's last word on each), make what was
        applied durable (the files written, then the directories touched, deepest first);
        returns the content bytes written."""
        times = dict(self._dir_times)  # a later record of the same directory wins
        for rel, ns in sorted(times.items(), key=lambda item: item[0].count("/") + bool(item[0]), reverse=True):
            path = self.path(rel)
            if lstat_or_none(path) is not None:
                os.utime(path, ns=(ns, ns), follow_symlinks=False)
        self._dir_times.clear()
        for path in self._written:
            fsync_path(path, missing_ok=True)  # a later member may have replaced or removed it
        for rel in sorted(self._touched, key=lambda r: r.count("/") + bool(r), reverse=True):
            fsync_path(self.path(rel), directory=True, missing_ok=True)
        self._written.clear()
        self._touched = {""}
        return self.bytes_written


def _sparse_size(member: tarfile.TarInfo) -> int:
    """A sparse member's real size (tarfile lets a PAX ``size`` record, written when the
    stored data passes 8 GiB, override ``GNU.sparse.realsize``)."""
    for key in ("GNU.sparse.realsize", "GNU.sparse.size"):
        text = member.pax_headers.get(key)
        if text is not None:
            if not text.isdigit():
                raise InvalidArgument(f"tar member {member.name!r}: sparse size {text[:40]!r} is not a number")
            return int(text)
    return member.size


def _checked_map(member: tarfile.TarInfo, size: int) -> list[tuple[int, int]]:
    """The member's sparse map, refused unless ascending, non-overlapping and inside the size."""
    entries = [(int(offset), int(length)) for offset, length in member.sparse or ()]
    end = 0
    for offset, length in entries:
        if offset < end or length < 0 or offset + length > size:
            raise InvalidArgument(f"tar member {member.name!r} has a malformed sparse map")
        end = offset + length
    return entries


class _ForwardReader(io.RawIOBase):
    """A stream as a raw file that seeks forward only (by reading it): under a large
    ``io.BufferedReader`` it lets tarfile's random-access reader (mode ``r:``) take an
    unseekable stream — headers come from the buffer, file data in large reads (tarfile's
    stream mode reads everything in 10 KiB records through every wrapper of the stream)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream, self._pos = stream, 0
        self._readinto = getattr(stream, "readinto", None)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # forward only; tell() is seek(0, SEEK_CUR)
        return True

    def readinto(self, buffer: Any) -> int:
        if self._readinto is not None:
            n = self._readinto(buffer)
        else:
            data = self._stream.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (self._pos if whence == io.SEEK_CUR else 0)
        if whence == io.SEEK_END or target < self._pos:
            raise io.UnsupportedOperation("a layer tar stream can only seek forward")
        while self._pos < target and (skipped := len(self._stream.read(min(target - self._pos, _COPY_CHUNK)))):
            self._pos += skipped  # read and dropped (tar padding, members nobody wrote out)
        return self._pos


def apply_tar(root: str | os.PathLike[str], stream: IO[bytes], applier: LayerTarApplier | None = None) -> int:
    """Apply a whole (uncompressed) OCI layer tar onto ``root``; returns the content bytes written."""
    applier = applier or LayerTarApplier(root)
    try:
        buffered = io.BufferedReader(_ForwardReader(stream), _COPY_CHUNK)
        tar = tarfile.open(fileobj=buffered, mode="r:", encoding=_ENCODING, errors=_ERRORS)
    except tarfile.TarError as exc:
        raise InvalidArgument(f"not a tar stream: {exc}") from exc
    with tar:
        try:
            for member in tar:
                applier.apply(tar, member)
        except tarfile.TarError as exc:
            raise InvalidArgument(f"malformed layer tar: {exc}") from exc
    return applier.finish()


def lstat_or_none(path: str | os.PathLike[str]) -> os.stat_result | None:
    """lstat of ``path``; None when nothing is there (or an ancestor is not a directory)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
