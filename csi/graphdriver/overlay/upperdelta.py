"""Incremental freezes of a mounted overlay layer: copy only what its upper dir changed
since its last mounted freeze, as a new frozen layer on top of that freeze.

A mounted writable layer W (parent P, upper dir U) cannot be rebased, so its freeze
copies U. The first such freeze F1 is a full copy of U with parent P. An
:class:`UpperIndex` written with F1 (``layers/<F1>/upper-index``, JSON, fsynced before
the freeze commits) records, for every entry of U at that time, the fingerprint of its
inode: type, inode number, ctime, mtime, mode, size, link count, owner, device number and,
for directories, opacity. The next mounted freeze F2 then holds only the difference:
F2's parent is F1, and the content of P + F1 + F2 equals U over P.

Why a fingerprint is exact: ctime cannot be set from user space, and every change of an
inode's content or metadata (data, mode, owner, xattrs, link count, rename) sets it to
the current time. An inode with the same number and ctime is therefore unchanged, as long
as the change could not have fallen into the same timestamp tick as the look: a
fingerprint is *trusted* only when its ctime is older than the scan's start by
:data:`TRUST_MARGIN_NS` (2 s: more than a clock tick and the 1 s granularity of ext4 with
small inodes); untrusted entries are copied again next time. The index also names the
boot (a power loss may leave an inode's metadata newer than its data), W's record and
its upper dir's inode: any mismatch means a full copy. Assumed: the wall clock is not
set back by more than the margin between two freezes of a boot (a repeated ctime could
then hide a change). Granularity is the file: a big file with a small change is copied
whole (extents cloned where the filesystem can).

Planning (:func:`plan`) walks U and the index together. Overlay's merge is a fold
(``view(D, F1, P) = merge(D, view(F1 + P))``), so with ``V`` = P's view and for each path:

* a non-directory with the same trusted fingerprint is skipped (F1 shows it);
  otherwise it is copied (whiteouts, the kernel's 0/0 character devices, included);
* a directory in both, of the same opacity, is a non-opaque directory in the delta
  (created only when its attributes changed or something below it is copied) and is
  walked; one that became opaque, or is new, is copied whole; one that stopped being
  opaque, or replaced a non-directory, is walked or copied only where V has no
  directory at that path (otherwise U merges with V there and F1 hides V);
* an entry gone from U gets a whiteout, unless U now shows V's entry at that path
  (then no whiteout can express it).

The last two cases need V: P's read-only view is mounted only when one occurs. Hard
links are copied all or nothing per inode: an inode is skipped only when every name it
has now was recorded with it, unchanged, and no name of it is copied. Anything that
cannot be expressed raises :class:`NotIncremental`; the caller makes a full copy.

:func:`scan` leaves out the whiteout format's bookkeeping names (aufs's ``.wh..wh.*``), so
no freeze copies them. :func:`build` copies as one :class:`~csi.host.treecopy.TreeCopier`
job (extents cloned where the filesystem can, hard links kept across the copied parts,
every file and directory it makes fsynced).
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from csi.graphdriver.diff.whiteouts import OVERLAY_OPAQUE_XATTR, WhiteoutFormat
from csi.graphdriver.overlay import upperdiff
from csi.host.atomicfile import write_atomic
from csi.host.fsinfo import fsync_dir
from csi.host.treecopy import TreeCopier, copy_metadata

INDEX_NAME = "upper-index"
INDEX_VERSION = 1
TRUST_MARGIN_NS = 2_000_000_000
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class NotIncremental(Exception):
    """The change cannot be expressed as a layer on top of the last freeze (the reason)."""


class Entry(NamedTuple):
    """One entry of an upper dir: its inode's fingerprint (see module docstring)."""

    fmt: int  # stat.S_IFMT
    ino: int
    ctime_ns: int
    mtime_ns: int
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    opaque: bool  # directories: trusted.overlay.opaque
    trusted: bool  # ctime older than the scan's start by TRUST_MARGIN_NS

    @property
    def is_dir(self) -> bool:
        return self.fmt == stat.S_IFDIR

    def same_inode_state(self, other: Entry) -> bool:
        return self.trusted and other.trusted and self[:11] == other[:11]


Tree = dict[str, Entry]  # relative path ("" = the root, "a/b") -> entry


def boot_id() -> str:
    return _BOOT_ID.read_text(encoding="ascii").strip()


def scan(root: Path, whiteouts: WhiteoutFormat, *, margin_ns: int = TRUST_MARGIN_NS) -> Tree:
    """Fingerprints of everything in ``root`` (not following symlinks)."""
    trusted_before = time.time_ns() - margin_ns
    tree: Tree = {}

    def entry(path: str, st: os.stat_result) -> Entry:
        is_dir = stat.S_ISDIR(st.st_mode)
        return Entry(stat.S_IFMT(st.st_mode), st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_mode, st.st_size,
                     st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, is_dir and whiteouts.is_opaque(path),
                     st.st_ctime_ns < trusted_before)

    tree[""] = entry(str(root), os.lstat(root))
    pending = [("", str(root))]
    while pending:
        rel, path = pending.pop()
        with os.scandir(path) as it:
            for item in it:
                if whiteouts.is_bookkeeping(item.name):
                    continue  # aufs's own: never content, never copied
                child = f"{rel}/{item.name}" if rel else item.name
                tree[child] = e = entry(item.path, item.stat(follow_symlinks=False))
                if e.is_dir:
                    pending.append((child, item.path))
    return tree


# ---------------------------------------------------------------------- the index


@dataclass(frozen=True)
class UpperIndex:
    """What a mounted freeze recorded about its source's upper dir (``upper-index``)."""

    source: str  # the writable layer's ID
    source_created: float  # its record's creation time (an ID may be reused)
    parent: str | None  # its parent at the freeze: the content below the upper dir
    upper: tuple[int, int]  # (st_dev, st_ino) of the upper dir
    boot: str  # /proc/sys/kernel/random/boot_id at the freeze
    depth: int  # incremental freezes since the last full copy (0: this one is full)
    entries: Tree = field(repr=False)

    def write(self, path: Path) -> None:
        """Write and fsync ``path`` (via a temporary name)."""
        doc: dict[str, Any] = {
            "version": INDEX_VERSION, "source": self.source, "source_created": self.source_created,
            "parent": self.parent, "upper": list(self.upper), "boot": self.boot, "depth": self.depth,
            "entries": [[rel, *e] for rel, e in self.entries.items()],
        }
        write_atomic(path, json.dumps(doc, separators=(",", ":")), sync_dir=False)  # ensure_ascii: any file name survives

    @classmethod
    def read(cls, path: Path) -> UpperIndex | None:
        """The index at ``path``; None when absent or not of this version."""
        try:
            with open(path, encoding="ascii") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return None
        if doc.get("version") != INDEX_VERSION:
            return None
        entries = {row[0]: Entry(*row[1:]) for row in doc["entries"]}
        return cls(doc["source"], doc["source_created"], doc["parent"], tuple(doc["upper"]), doc["boot"],
                   doc["depth"], entries)


# ---------------------------------------------------------------------- planning


@dataclass
class Delta:
    """What the new frozen layer's diff dir holds, as paths relative to the upper dir."""

    copies: list[str] = field(default_factory=list)  # copied whole (a directory with everything below)
    whiteouts: list[str] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)  # walked directories that get a (non-opaque) node

    def entries(self) -> int:
        return len(self.copies) + len(self.whiteouts) + len(self.dirs)


Below = Callable[[str], "os.stat_result | None"]  # what P's view shows at a path (None: nothing)


def _children(tree: Tree) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for rel in tree:
        if rel:
            parent, _, name = rel.rpartition("/")
            result.setdefault(parent, []).append(name)
    return result


def _is_whiteout(e: Entry) -> bool:
    return e.fmt == stat.S_IFCHR and e.rdev == 0


def plan(old: Tree, new: Tree, below: Below) -> Delta:
    """The delta that turns the view of ``old`` (over P) into that of ``new`` (see the
    module docstring); raise NotIncremental where none exists."""
    if new[""].opaque or old[""].opaque or not new[""].is_dir or not old[""].is_dir:
        raise NotIncremental("an upper root dir is opaque")

    def below_is_dir(rel: str) -> bool:
        st = below(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    delta = Delta()
    skipped: dict[str, int] = {}
    new_children, old_children = _children(new), _children(old)
    pending = [("", True)]  # (walked directory, whether U merges with P's view there)
    while pending:
        parent, merges = pending.pop()
        for name in sorted(set(new_children.get(parent, ())) | set(old_children.get(parent, ()))):
            rel = f"{parent}/{name}" if parent else name
            was, now = old.get(rel), new.get(rel)
            if now is None:
                assert was is not None
                if merges and below(rel) is not None:
                    raise NotIncremental(f"{rel!r} left the upper dir and shows the parent's entry again")
                if not _is_whiteout(was):
                    delta.whiteouts.append(rel)
            elif now.is_dir:
                if was is None or (was.is_dir and now.opaque and not was.opaque):
                    delta.copies.append(rel)
                elif was.is_dir and now.opaque == was.opaque:
                    if not now.same_inode_state(was):
                        delta.dirs.add(rel)
                    pending.append((rel, merges and not now.opaque))
                elif merges and not now.opaque and below_is_dir(rel):
                    raise NotIncremental(f"{rel!r} merges with the parent's directory, the last freeze hid it")
                elif was.is_dir:  # was opaque, is not, and there is nothing below to merge with
                    delta.dirs.add(rel)
                    pending.append((rel, False))
                else:  # replaced a non-directory
                    delta.copies.append(rel)
            elif was is not None and not was.is_dir and now.same_inode_state(was):
                skipped[rel] = now.ino
            else:
                delta.copies.append(rel)
    _whole_hard_links(old, new, delta, skipped)
    for rel in [*delta.copies, *delta.whiteouts, *list(delta.dirs)]:
        parent = rel.rpartition("/")[0]
        while parent and parent not in delta.dirs:
            delta.dirs.add(parent)
            parent = parent.rpartition("/")[0]
    delta.copies.sort()
    delta.whiteouts.sort()
    return delta


def _names_by_inode(tree: Tree) -> dict[int, set[str]]:
    names: dict[int, set[str]] = {}
    for rel, e in tree.items():
        if not e.is_dir:
            names.setdefault(e.ino, set()).add(rel)
    return names


def _whole_hard_links(old: Tree, new: Tree, delta: Delta, skipped: dict[str, int]) -> None:
    """Copy every skipped name of an inode that has a name copied, gained or lost one."""
    new_names, old_names = _names_by_inode(new), _names_by_inode(old)
    for ino in set(skipped.values()):
        names = new_names[ino]
        if names == old_names.get(ino) and all(n in skipped for n in names):
            continue
        for rel in names:
            if skipped.pop(rel, None) is not None:
                delta.copies.append(rel)


# ---------------------------------------------------------------------- building


def lookup(root: Path | None, rel: str) -> os.stat_result | None:
    """What a merged read-only view at ``root`` shows at ``rel``, never following a symlink
    (an ancestor that is not a directory, or a 0/0 whiteout, means nothing)."""
    st = upperdiff.lookup(root, rel)
    return None if st is None or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) else st


def build(upper: Path, out: Path, delta: Delta, whiteouts: WhiteoutFormat) -> int:
    """Create ``out`` holding ``delta`` of ``upper``, every file and directory fsynced;
    return the bytes of file data copied."""
    os.mkdir(out, 0o700)
    for rel in sorted(delta.dirs, key=lambda r: r.count("/")):
        os.mkdir(out / rel, 0o700)
    copier = TreeCopier(durable=True)  # one job: hard links kept across the copied parts
    for rel in delta.copies:
        src, dst = upper / rel, out / rel
        st = os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            copier.tree(src, dst)
        else:
            copier.entry(src, dst, st)
    for rel in delta.whiteouts:
        parent, _, name = rel.rpartition("/")
        whiteouts.make_whiteout(str(out / parent), name)
    for rel in sorted(delta.dirs | {""}, key=lambda r: -r.count("/")):  # children first
        _walked_dir_metadata(upper / rel if rel else upper, out / rel if rel else out)
    return copier.bytes


def _walked_dir_metadata(src: Path, dst: Path) -> None:
    """The directory's attributes, never its opacity (a walked dir merges with F1's)."""
    copy_metadata(src, dst, os.lstat(src), skip_xattr=OVERLAY_OPAQUE_XATTR.__eq__)
    fsync_dir(dst)


def full(new: Tree) -> Delta:
    """The delta of a full copy: everything in the upper dir."""
    return Delta(copies=sorted(rel for rel in new if rel and "/" not in rel))
