"""Native diffs of layered (overlay/aufs) layers: a layer's diff dir <-> an OCI layer tar.

A layer's diff dir holds exactly its changes against its parent, so its OCI layer tar is
the diff dir itself with the directory's own form of deletions translated
(:class:`~csi.graphdriver.diff.whiteouts.WhiteoutFormat`). Everything about the tar
format (headers, PAX times, xattrs, hard links, markers, reading, path safety) is the
one codec, :mod:`csi.graphdriver.diff.ocitar`; this module only walks and fills diff dirs:

* :func:`walk`: a diff dir in sorted pre-order, never showing (nor entering) a name the
  format calls bookkeeping (aufs's ``.wh..wh.*``);
* :func:`diff_stream` / :func:`write_layer_tar`: the root as ``./``, then every entry; a
  whiteout becomes an OCI whiteout, an opaque directory its entry followed by its opaque
  marker. :func:`diff_size` is that stream's length, counted without reading file data;
* :func:`layer_changes`: the changes the diff dir records against ``below`` (a read-only
  view of the parent's full content);
* :class:`UpperApplier` / :func:`apply_layer_tar`: a tar into the diff dir of an
  unmounted layer, given ``below``: whiteouts are written only where ``below`` has the
  path (an unneeded whiteout would show in a directory overlay does not merge); a
  directory the tar makes where the layer hid a lower one is made opaque; a directory
  the tar implies gets the lower directory's attributes; a hard link to a file only
  ``below`` holds copies that file up first.

A failed apply raises InvalidArgument; what it had written stays in the (writable,
unmounted) layer, which the caller removes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from csi.errors import InvalidArgument
from csi.graphdriver.diff.ocitar import LayerTarApplier, LayerTarWriter, TarSizer, apply_tar, lstat_or_none
from csi.graphdriver.diff.whiteouts import WhiteoutFormat, is_private_xattr
from csi.graphdriver.driver import Change, ChangeKind
from csi.host.pipestream import pipe_stream
from csi.host.treecopy import copy_entry, copy_metadata


def diff_stream(layer_dir: Path, fmt: WhiteoutFormat) -> IO[bytes]:
    """The OCI layer tar (PAX) of ``layer_dir``, produced by a thread into a pipe."""
    return pipe_stream(lambda out: write_layer_tar(layer_dir, fmt, out), f"diff-{layer_dir.parent.name}")


def walk(layer_dir: Path, fmt: WhiteoutFormat) -> Iterator[tuple[str, str, str, os.stat_result]]:
    """(relative dir, entry name, full path, lstat) in sorted pre-order, root and
    bookkeeping names (with everything below them) excluded."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(layer_dir, rel_dir)
        subdirs = []
        for name in sorted(os.listdir(full_dir)):
            if fmt.is_bookkeeping(name):
                continue
            full = os.path.join(full_dir, name)
            st = os.lstat(full)
            yield rel_dir, name, full, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(os.path.join(rel_dir, name))
        stack.extend(reversed(subdirs))


def write_layer_tar(layer_dir: Path, fmt: WhiteoutFormat, out: IO[bytes] | TarSizer) -> None:
    """Write ``layer_dir`` as an OCI layer tar (see the module docstring)."""
    with LayerTarWriter(out) as writer:
        writer.add(layer_dir, ".")
        if fmt.is_opaque(str(layer_dir)):
            writer.add_opaque("")
        for rel_dir, name, full, st in walk(layer_dir, fmt):
            arc = os.path.join(rel_dir, name)
            hidden = fmt.whiteout_target(rel_dir, name, st)
            if hidden is not None:
                writer.add_whiteout(os.path.join(rel_dir, hidden))
                continue
            writer.add(full, arc, st)
            if stat.S_ISDIR(st.st_mode) and fmt.is_opaque(full):
                writer.add_opaque(arc)


def diff_size(layer_dir: Path, fmt: WhiteoutFormat) -> int:
    """Length in bytes of the stream :func:`diff_stream` produces, without reading data."""
    sizer = TarSizer()
    write_layer_tar(layer_dir, fmt, sizer)
    return sizer.count


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
    for rel_dir, name, full, st in walk(layer_dir, fmt):
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


class UpperApplier(LayerTarApplier):
    """The codec's applier, storing into an unmounted diff dir whose parent's full view is
    ``below`` (see the module docstring)."""

    def __init__(self, layer_dir: Path, below: Path | None, fmt: WhiteoutFormat) -> None:
        super().__init__(layer_dir)
        self.below, self.fmt = below, fmt

    def _split(self, rel: str) -> tuple[str, str]:
        parent, _, name = rel.rpartition("/")
        return str(self.path(parent)), name

    def is_absent(self, rel: str, st: os.stat_result) -> bool:
        parent, name = self._split(rel)
        return self.fmt.whiteout_target(parent, name, st) is not None

    def clear(self, rel: str, existing: os.stat_result | None) -> None:
        super().clear(rel, existing)
        whiteout = self.fmt.existing_whiteout(*self._split(rel))
        if whiteout is not None:  # aufs keeps it beside the name
            os.unlink(whiteout)

    def make_dir(self, rel: str, existing: os.stat_result | None) -> None:
        self._new_dir(rel, existing)

    def implied_dir(self, rel: str, existing: os.stat_result | None) -> None:
        lower = self._new_dir(rel, existing)
        if lower is not None:  # the directory this layer merges with keeps its attributes
            copy_metadata(self.below / rel, self.path(rel), lower, skip_xattr=is_private_xattr)  # type: ignore[operator]
            self.keep_dir_time(rel, lower.st_mtime_ns)

    def _new_dir(self, rel: str, existing: os.stat_result | None) -> os.stat_result | None:
        """Make directory ``rel``, opaque where it replaces something that hid a lower
        directory; return the lower directory's lstat (None: no directory below)."""
        hidden = existing is not None or self.fmt.existing_whiteout(*self._split(rel)) is not None
        self.clear(rel, existing)
        os.mkdir(self.path(rel), 0o755)
        lower = lookup(self.below, rel)
        if lower is None or not stat.S_ISDIR(lower.st_mode):
            return None
        if hidden:
            self.fmt.make_opaque(str(self.path(rel)))
        return lower

    def whiteout(self, rel: str) -> None:
        if lookup(self.below, rel) is None:  # nothing below to hide: deleting here is all
            super().whiteout(rel)
            return
        path = self.resolve(rel)
        self.clear(rel, lstat_or_none(path))
        self.fmt.make_whiteout(*self._split(rel))

    def opaque(self, rel: str) -> None:
        directory = self.resolve(rel + "/x").parent if rel else self.root
        super().opaque(rel)
        self.fmt.make_opaque(str(directory))

    def link_source(self, rel: str) -> Path:
        if lookup(self.root, rel) is None:  # only below: copy it up, then link to the copy
            lower = lookup(self.below, rel)
            if lower is None or stat.S_ISDIR(lower.st_mode):
                raise InvalidArgument(f"hard link to {rel!r}, which is not in the layer or below it")
            target = self.resolve(rel)
            self.clear(rel, lstat_or_none(target))
            copy_entry(self.below / rel, target, lower, skip_xattr=is_private_xattr)  # type: ignore[operator]
        return super().link_source(rel)


def apply_layer_tar(layer_dir: Path, below: Path | None, fmt: WhiteoutFormat, stream: IO[bytes]) -> int:
    """Apply an OCI layer tar onto ``layer_dir`` whose parent's full view is ``below``;
    return the bytes of file data written."""
    return apply_tar(layer_dir, stream, UpperApplier(layer_dir, below, fmt))
