"""The naive differ: diffs of drivers without a native one, by walking two trees.

``NaiveDiffer(driver)`` mounts the layer and the parent with ``driver.get`` (and
``put``s them afterwards) and compares the two trees path by path.

A path is *added* (only in the layer), *deleted* (only in the parent; paths below a
deleted directory are implied, not listed) or *modified*: a different type, mode,
uid/gid, device number, size, mtime (ns), xattr set, symlink target, hard-link group
(the paths sharing the inode), or — when all of that is equal — different content
(``verify_content``, on by default: copies keep mtimes and timestamps can be coarse, so
size+mtime alone may miss an overwrite; ``False`` gives an rsync-like quick check). When both
trees lie on one btrfs filesystem, two files with identical extent maps (a snapshot's or a
reflinked copy's shared data) are equal without being read
(:mod:`csi.graphdriver.diff.extents`), so a diff after a small change reads about the change.
A directory with changes below it is listed as modified too (as Docker does), so its
metadata travels with the diff. A directory counts as *replaced* when the parent had
entries in it and none of their names is left: the tar then carries an opaque marker
instead of one whiteout per old entry.

``diff`` streams the OCI layer tar (:mod:`csi.graphdriver.diff.ocitar`) from a producer
thread through a pipe (:func:`~csi.host.pipestream.pipe_stream`), file data with
sendfile(2); the two layers stay mounted (``get``) until the stream ends or is closed.
``diff_size`` is **the length in bytes of that tar stream** (headers and padding
included), computed by writing the same stream into a :class:`~csi.graphdriver.diff.ocitar.TarSizer`
(headers only: no file data is read).
``apply_diff`` applies a tar onto the writable layer ``id`` whose parent must be
``parent``, and returns the content bytes of the regular files it wrote.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from csi.errors import InvalidArgument
from csi.graphdriver.diff.extents import same_btrfs, shares_extents
from csi.graphdriver.diff.ocitar import LayerTarWriter, TarSizer, apply_tar, read_xattrs
from csi.graphdriver.driver import Change, ChangeKind, Driver
from csi.host.pipestream import pipe_stream
from csi.ids import check_layer_id

_COMPARE_CHUNK = 1 << 20


@dataclass(frozen=True)
class DiffEntry:
    """One step of a diff, in tar order (a directory before its content)."""

    path: str  # relative, "a/b"
    kind: str  # "added" | "modified" | "deleted" | "opaque"
    implied: bool = False  # a deletion covered by its directory's opaque marker


class _Tree:
    """``lstat`` of every path below a root, and the hard-link groups."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.stats: dict[str, os.stat_result] = {}
        self.children: dict[str, list[str]] = {"": []}
        self._groups: dict[tuple[int, int], list[str]] = {}
        if root is not None:
            self._scan("")

    def _scan(self, top: str) -> None:
        assert self.root is not None
        pending = [top]
        while pending:  # iterative: no recursion limit on nesting depth
            rel = pending.pop()
            names: list[str] = []
            with os.scandir(self.root / rel if rel else self.root) as it:
                for entry in it:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    st = entry.stat(follow_symlinks=False)
                    self.stats[child] = st
                    names.append(entry.name)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(child)
                    elif st.st_nlink > 1:
                        self._groups.setdefault((st.st_dev, st.st_ino), []).append(child)
            self.children[rel] = sorted(names)

    def is_dir(self, rel: str) -> bool:
        if rel == "":
            return self.root is not None
        st = self.stats.get(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def path(self, rel: str) -> Path:
        assert self.root is not None
        return self.root / rel

    def link_group(self, rel: str) -> frozenset[str]:
        st = self.stats[rel]
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):
            return frozenset((rel,))
        return frozenset(self._groups.get((st.st_dev, st.st_ino), [rel]))


class NaiveDiffer:
    """Diff, changes, apply and size by walking trees (see module docstring)."""

    def __init__(self, driver: Driver, *, verify_content: bool = True) -> None:
        self.driver = driver
        self.verify_content = verify_content
        self._cow = False  # the two trees being compared share one btrfs filesystem

    # ------------------------------------------------------------------ contract

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        """The tar, streamed while it is made (never staged on disk); both layers are
        checked here and held (``get``) until the stream ends or is closed."""
        trees = ExitStack()
        new, old = trees.enter_context(self._trees(layer_id, parent))

        def produce(out: IO[bytes]) -> None:
            with trees:
                self._write_trees(new, old, out)

        try:
            return pipe_stream(produce, f"diff-{layer_id}")
        except BaseException:
            trees.close()
            raise

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        counter = TarSizer()
        with self._trees(layer_id, parent) as (new, old):
            self._write_trees(new, old, counter)
        return counter.count

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        with self._trees(layer_id, parent) as (new, old):
            entries = list(self.compare(new, old))
        return [Change("/" + e.path, ChangeKind(e.kind)) for e in entries if e.kind != "opaque"]

    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes]) -> int:
        check_layer_id(layer_id)
        if parent is not None:
            check_layer_id(parent, "parent layer id")
        layer = self.driver.layer(layer_id)
        if layer.frozen:
            raise InvalidArgument(f"layer {layer_id} is frozen: a diff can only be applied to a writable layer")
        if layer.parent != parent:
            raise InvalidArgument(f"layer {layer_id} has parent {layer.parent!r}, not {parent!r}")
        with self.driver.view(layer_id) as root:
            return apply_tar(root, stream)

    # ------------------------------------------------------------------ walking

    @contextmanager
    def _trees(self, layer_id: str, parent: str | None) -> Iterator[tuple[_Tree, _Tree]]:
        check_layer_id(layer_id)
        if parent is not None:
            check_layer_id(parent, "parent layer id")
        self.driver.layer(layer_id)
        if parent is not None:
            self.driver.layer(parent)
        with ExitStack() as stack:  # views, not get/put: a killed reader leaves no reference behind
            new_root = stack.enter_context(self.driver.view(layer_id))
            old_root = stack.enter_context(self.driver.view(parent)) if parent is not None else None
            yield _Tree(new_root), _Tree(old_root)

    def compare(self, new: _Tree, old: _Tree) -> Iterator[DiffEntry]:
        """The diff entries of ``new`` against ``old``, in tar order (pre-order, names
        sorted; a directory's opaque marker and deletions right after its own entry).
        Iterative, so nesting depth is not limited by Python's recursion limit."""
        kinds: dict[str, str] = {}
        changed_below: set[str] = set()
        self._cow = new.root is not None and old.root is not None and same_btrfs(new.root, old.root)

        def mark(rel: str) -> None:  # rel and its ancestors contain changes
            while rel not in changed_below:
                changed_below.add(rel)
                if not rel:
                    return
                rel = rel.rpartition("/")[0]

        for rel, st in new.stats.items():
            ost = old.stats.get(rel)
            if ost is None:
                kinds[rel] = "added"
            elif stat.S_IFMT(st.st_mode) != stat.S_IFMT(ost.st_mode) or self._differs(rel, st, ost, new, old):
                kinds[rel] = "modified"
            else:
                continue
            mark(rel.rpartition("/")[0])
        deletions: dict[str, list[str]] = {}
        for rel in old.stats:
            if rel not in new.stats:
                parent, _, name = rel.rpartition("/")
                if new.is_dir(parent) and old.is_dir(parent):  # else the parent's own entry replaces it
                    deletions.setdefault(parent, []).append(name)
                    mark(parent)

        def header(rel: str) -> Iterator[DiffEntry]:
            gone = sorted(deletions.get(rel, ()))
            old_names = old.children.get(rel, []) if old.is_dir(rel) else []
            opaque = bool(old_names) and not set(old_names) & set(new.children.get(rel, []))
            if opaque:
                yield DiffEntry(rel, "opaque")
            for name in gone:
                yield DiffEntry(f"{rel}/{name}" if rel else name, "deleted", implied=opaque)

        yield from header("")
        stack: list[tuple[str, Iterator[str]]] = [("", iter(new.children.get("", [])))]
        while stack:
            prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = f"{prefix}/{name}" if prefix else name
            kind = kinds.get(child) or ("modified" if child in changed_below else None)
            if kind is not None:
                yield DiffEntry(child, kind)
            if new.is_dir(child) and (kind == "added" or child in changed_below or child in kinds):
                yield from header(child)
                stack.append((child, iter(new.children.get(child, []))))

    def _differs(self, rel: str, st: os.stat_result, ost: os.stat_result, new: _Tree, old: _Tree) -> bool:
        if (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) != (ost.st_mode, ost.st_uid, ost.st_gid, ost.st_mtime_ns):
            return True
        mode = st.st_mode
        if not stat.S_ISDIR(mode):
            if st.st_size != ost.st_size or st.st_nlink != ost.st_nlink:
                return True
            if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and st.st_rdev != ost.st_rdev:
                return True
            if st.st_nlink > 1 and new.link_group(rel) != old.link_group(rel):
                return True
        if stat.S_ISLNK(mode) and os.readlink(new.path(rel)) != os.readlink(old.path(rel)):
            return True
        if read_xattrs(new.path(rel)) != read_xattrs(old.path(rel)):
            return True
        if stat.S_ISREG(mode) and self.verify_content and (st.st_dev, st.st_ino) != (ost.st_dev, ost.st_ino):
            if self._cow and shares_extents(new.path(rel), old.path(rel)):
                return False
            return not _same_content(new.path(rel), old.path(rel))
        return False

    def _write_trees(self, new: _Tree, old: _Tree, out: IO[bytes] | TarSizer) -> None:
        with LayerTarWriter(out) as writer:
            for entry in self.compare(new, old):
                if entry.kind == "opaque":
                    writer.add_opaque(entry.path)
                elif entry.kind == "deleted":
                    if not entry.implied:
                        writer.add_whiteout(entry.path)
                else:
                    writer.add(new.path(entry.path), entry.path, new.stats[entry.path])


def _same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk_a, chunk_b = fa.read(_COMPARE_CHUNK), fb.read(_COMPARE_CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True
