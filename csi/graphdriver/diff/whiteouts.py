"""Whiteouts: how a layer says "deleted" and "opaque", in a tar and on disk.

In an OCI layer tar (image spec, "layer changesets"):

* a deleted path ``dir/name`` is the empty regular file ``dir/.wh.name`` (a *whiteout*);
* a directory whose lower content is hidden entirely carries ``dir/.wh..wh..opq`` (an
  *opaque* marker), written right after the directory's own entry;
* other ``.wh..wh.*`` names, and anything below one, are reserved (aufs's bookkeeping)
  and mean nothing in a tar.

:func:`classify` says what a member name means and refuses names that leave the layer
(absolute, ``..``, NUL); :func:`whiteout_name` / :func:`opaque_name` build the names.

On disk a layer directory of a union filesystem stores the same facts in its own form,
described by a :class:`WhiteoutFormat`:

* overlay (:data:`OVERLAY_WHITEOUTS`): a whiteout is a 0/0 character device named like
  the deleted entry; an opaque directory has ``trusted.overlay.opaque=y``;
* aufs (:data:`AUFS_WHITEOUTS`): the OCI names themselves (``.wh.NAME`` files, a
  ``.wh..wh..opq`` file in an opaque directory), plus aufs's bookkeeping entries
  ``.wh..wh.aufs``, ``.wh..wh.orph`` and ``.wh..wh.plnk`` in a branch's root, which are
  never content: nothing that shows, diffs or lists a layer may include them.

Xattrs under ``trusted.overlay.`` (:func:`is_private_xattr`) are a filesystem's own
bookkeeping, never layer content: they are neither written to a tar nor taken from one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath

from csi.errors import InvalidArgument

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
AUFS_BOOKKEEPING = (".wh..wh.aufs", ".wh..wh.orph", ".wh..wh.plnk")  # what aufs keeps in a branch root
AUFS_PLINK_DIR = ".wh..wh.plnk"  # pseudo-links (see csi.graphdriver.overlay.aufs)
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_PRIVATE_XATTRS = (OVERLAY_XATTR_PREFIX,)


def is_private_xattr(name: str) -> bool:
    """A filesystem's own bookkeeping xattr (never layer content)."""
    return name.startswith(_PRIVATE_XATTRS)


# ---------------------------------------------------------------------- names in a tar


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
    if any(part.startswith(WHITEOUT_META_PREFIX) for part in pure.parts[:-1]):
        return MemberName(MemberKind.RESERVED, path)  # inside aufs's bookkeeping: never content
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


# ---------------------------------------------------------------------- forms on disk


@dataclass(frozen=True)
class WhiteoutFormat:
    """How a layer dir marks deletions (whiteouts) and opaque directories on disk.

    ``native_oci`` is True for aufs: its on-disk names already are the OCI names.
    """

    name: str
    native_oci: bool

    def whiteout_target(self, dirpath: str, entry: str, st: os.stat_result) -> str | None:
        """If ``entry`` (in ``dirpath``) is a whiteout, the name it deletes, else None."""
        if self.native_oci:
            if entry.startswith(WHITEOUT_PREFIX) and not entry.startswith(WHITEOUT_META_PREFIX):
                return entry[len(WHITEOUT_PREFIX):]
            return None
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return entry
        return None

    def is_bookkeeping(self, entry: str) -> bool:
        """Names that are neither content nor whiteouts: aufs's ``.wh..wh.*`` (its opaque
        marker included: opacity is read with :meth:`is_opaque`). Nothing is ever listed,
        diffed or copied below such a name."""
        return self.native_oci and entry.startswith(WHITEOUT_META_PREFIX)

    def is_opaque(self, path: str) -> bool:
        if self.native_oci:
            return os.path.lexists(os.path.join(path, OPAQUE_MARKER))
        try:
            return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
        except OSError:
            return False

    def make_whiteout(self, dirpath: str, name: str) -> None:
        if self.native_oci:
            fd = os.open(os.path.join(dirpath, WHITEOUT_PREFIX + name), os.O_CREAT | os.O_WRONLY, 0o444)
            os.close(fd)
        else:
            os.mknod(os.path.join(dirpath, name), 0o600 | stat.S_IFCHR, 0)

    def existing_whiteout(self, dirpath: str, name: str) -> str | None:
        """Path of the whiteout for ``name`` in ``dirpath`` if there is one."""
        path = os.path.join(dirpath, WHITEOUT_PREFIX + name if self.native_oci else name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        entry = os.path.basename(path)
        return path if self.whiteout_target(dirpath, entry, st) is not None else None

    def make_opaque(self, path: str) -> None:
        if self.native_oci:
            fd = os.open(os.path.join(path, OPAQUE_MARKER), os.O_CREAT | os.O_WRONLY, 0o444)
            os.close(fd)
        else:
            os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)


OVERLAY_WHITEOUTS = WhiteoutFormat("overlay", native_oci=False)
AUFS_WHITEOUTS = WhiteoutFormat("aufs", native_oci=True)
