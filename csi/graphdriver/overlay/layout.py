"""The layered directory layout shared by the overlay and aufs drivers (Docker overlay2-like).

On-disk layout under a driver home::

    <home>/layers/<id>/diff     the layer's own content: the upper dir of a writable layer,
                                the whole (read-only) layer of a frozen one
    <home>/layers/<id>/work     overlay's work dir (writable layers only)
    <home>/layers/<id>/merged   where ``get`` mounts the layer's full view
    <home>/layers/<id>/link     the layer's short name (10 characters of [A-Z2-7]): the first
                                characters of base32(sha256(<id>)) (:func:`derived_short`), so
                                a link file or ``l/`` symlink a power cut lost is made again
                                from the ID (:meth:`Layout.repair`); a random name (written
                                durably) only if that one is taken
    <home>/layers/<id>/lower    the short names of its ancestors, nearest first, ``:``-joined
                                (informational, as Docker writes it; mounts use the records)
    <home>/l/<short>            symlink -> ../layers/<id>/diff
    <home>/empty                an empty directory: the lower of a writable layer without parent
    <home>/tmp/                 private scratch mounts (lower views for diffs); swept at start-up

A mount's option string names lowers by short name with the mount's working directory set
to ``<home>/l``, so 500 lowers stay near one page (``csi.host.mount`` switches to the new mount
API beyond it).

This module knows paths and their life cycle only: how deletions are stored in a diff
dir is :mod:`csi.graphdriver.diff.whiteouts`, copying is :mod:`csi.host.treecopy`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from csi.host import mount as mnt
from csi.host.treecopy import remove_tree
from csi.ids import is_layer_id
from csi.host.atomicfile import write_atomic

SHORT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
SHORT_LEN = 10


def link_target(layer_id: str) -> str:
    """What ``l/<short>`` points to (relative: the home may move)."""
    return f"../layers/{layer_id}/diff"


def derived_short(layer_id: str) -> str:
    """The short name a layer gets unless it is taken: it follows from the ID alone."""
    return base64.b32encode(hashlib.sha256(layer_id.encode()).digest()).decode("ascii")[:SHORT_LEN]


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
        short = derived_short(layer_id)
        if os.path.lexists(self.links / short):  # taken (a hash prefix collision): a random name, kept durably
            short = "".join(secrets.choice(SHORT_ALPHABET) for _ in range(SHORT_LEN))
            write_atomic(top / "link", short, sync_dir=False)
        else:  # not fsynced: a lost or empty link file is derived again from the ID
            (top / "link").write_text(short, encoding="ascii")
        self.write_lower(layer_id, lowers)
        os.symlink(link_target(layer_id), self.links / short)
        return short

    def short(self, layer_id: str) -> str:
        """The layer's short name (its ``l/`` link); an empty or missing link file (a power
        cut) means the derived one."""
        return self._read_link(layer_id) or derived_short(layer_id)

    def _read_link(self, layer_id: str) -> str:
        """The link file's content, stripped ("" when missing or empty; raises
        FileNotFoundError when the layer directory itself is missing)."""
        try:
            fd = os.open(os.path.join(self.layers, layer_id, "link"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not self.layer_dir(layer_id).is_dir():
                raise
            return ""
        try:
            return os.read(fd, 64).decode("ascii").strip()
        finally:
            os.close(fd)

    def repair(self, layer_id: str, links: dict[str, str] | None = None) -> bool:
        """Make a layer's link file and ``l/`` symlink again where a power cut lost them (their
        creation is not fsynced); True if something was made.

        ``links`` (from :meth:`sweep`: each name in ``l/`` and where it points) replaces a lookup
        per layer, and a name made here is added to it. With it, a layer whose derived name in
        ``l/`` points to it needs only a ``stat`` of its link file: ``make`` and ``repair`` make
        ``l/<name>`` for the name the link file holds (or the derived one, written into an empty
        file), so such a file holds the derived name unless it is empty — and its data block,
        which costs a disk read per layer after a reboot, is not read."""
        derived = derived_short(layer_id)
        if links is not None and links.get(derived) == link_target(layer_id):
            try:
                if os.stat(os.path.join(self.layers, layer_id, "link")).st_size == len(derived):
                    return False
            except FileNotFoundError:
                pass
        written = self._read_link(layer_id)
        short = written or derived
        made = False
        if not written:
            write_atomic(self.layer_dir(layer_id) / "link", short, sync_dir=False)
            made = True
        present = short in links if links is not None else os.path.lexists(self.links / short)
        if not present:
            os.symlink(link_target(layer_id), self.links / short)
            if links is not None:
                links[short] = link_target(layer_id)
            made = True
        return made

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
        remove_tree(work)
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
            remove_tree(top)

    def mounted(self) -> set[str]:
        """IDs whose ``merged`` dir is a mount point: one read of the mount table."""
        prefix = os.path.realpath(self.layers) + "/"
        found = set()
        for mp in mnt.mounts_under(self.layers):
            layer_id, _, rest = mp.target[len(prefix):].partition("/")
            if rest == "merged" and mp.target.startswith(prefix):
                found.add(layer_id)
        return found

    def on_disk(self) -> set[str]:
        """IDs that have a directory under ``layers/``."""
        if not self.layers.exists():
            return set()
        return {name for name in os.listdir(self.layers) if is_layer_id(name)}

    def read_links(self) -> dict[str, str]:
        """Each name in ``l/`` and where it points ("" for an entry that is not a symlink)."""
        found: dict[str, str] = {}
        links = os.open(self.links, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in os.listdir(links):
                try:
                    found[name] = os.readlink(name, dir_fd=links)
                except FileNotFoundError:
                    pass
                except OSError:  # not a symlink (nothing strata makes)
                    found[name] = ""
        finally:
            os.close(links)
        return found

    def sweep(self) -> dict[str, str]:
        """Start-up hygiene: drop dangling ``l/`` links and leftover scratch mounts. Returns the
        links kept, as :meth:`read_links` (for :meth:`repair`)."""
        kept = self.read_links()
        links = os.open(self.links, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # relative to one directory fd: no path objects per link
            for name in list(kept):
                try:
                    os.stat(name, dir_fd=links)  # through the link
                except FileNotFoundError:
                    os.unlink(name, dir_fd=links)
                    del kept[name]
        finally:
            os.close(links)
        for mp in mnt.mounts_under(self.scratch):
            if os.path.realpath(mp.target) != os.path.realpath(self.scratch):
                mnt.unmount(mp.target, detach=True)
        for name in os.listdir(self.scratch):
            remove_tree(self.scratch / name)
        return kept
