"""The aufs driver: the overlay driver's layout and freezes with aufs branch mounts.

aufs is overlay's predecessor and is absent from mainline kernels (and from this one):
:meth:`AufsDriver.check_support` raises NotSupported("aufs not in /proc/filesystems")
there, so the registry moves on. Where a kernel carries aufs, everything but the mounts
and the pseudo-link flush comes from :class:`~csi.graphdriver.overlay.driver.OverlayDriver`
(layout, O(1) and copying freezes with their crash recovery, native diffs, and size
enforcement by XFS project quota on the rw branch, the ``diff`` dir, where the home is on
XFS with ``prjquota``).

Mount plans (data, :meth:`AufsDriver.mount_plan`; performed in order by
:mod:`csi.host.mount` at one target, the working directory ``<home>/l`` so lowers are
short ``l/`` names):

* writable layer: ``aufs none`` with ``br:<diff>=rw:<short1>=ro+wh:...``, ``dio``,
  ``xino=/dev/shm/aufs.xino`` (Docker's choice: the xino file must live on a filesystem
  aufs can write it to), lowers nearest first;
* frozen layer, with or without parent: the same with only ``=ro+wh`` branches and
  ``ro``. A frozen layer without parent is a one-branch aufs mount too, never a bind
  mount of its diff dir, which would show aufs's bookkeeping;
* deep chains: aufs parses a mount's options into one page of its own option table
  (about 85 entries on x86_64, whatever the string's length), so the first mount carries
  at most :data:`BRANCHES_PER_MOUNT` branches and each further lower is added by a
  ``remount,append:<short>=ro+wh`` step (``ro`` kept on a read-only view), as Docker's
  aufs driver does. aufs is built with at most 127 branches by default
  (CONFIG_AUFS_BRANCH_MAX_127): a chain holds at most :data:`MAX_BRANCHES` layers,
  upper included; ``create`` beyond that raises OutOfRange, and a freeze that would
  rebase a layer past it copies instead.

Whiteouts are aufs's own, which already are the OCI form (``.wh.NAME`` files, a
``.wh..wh..opq`` file in an opaque directory). ``.wh..wh.aufs``, ``.wh..wh.orph`` and
``.wh..wh.plnk`` are aufs's bookkeeping in a branch's root: never shown (views are aufs
mounts), diffed, listed in changes, copied by a freeze, or taken from a tar
(:mod:`csi.graphdriver.diff.whiteouts`).

Pseudo-links: a new hard link, made through the mount, to a file of a lower branch does
not copy that file up; aufs keeps the copy as a pseudo-link ``.wh..wh.plnk/<ino>.<n>``
and links the new name to it. Before a mounted writable layer's diff dir is read (a
freeze, a native diff) and before it is unmounted, the driver flushes them as
``auplink <mnt> flush`` does (:func:`flush_pseudo_links`): maintenance mode on
``/proc/fs/aufs/plink_maint`` (``si=<id>``), a no-op ``chown`` through the mount of every
name whose inode is pseudo-linked (aufs copies the name up as a link of its
pseudo-link), ``clean``, then the pseudo-link files are removed. The diff dir then holds
every hard-link group the view shows.

Verified on a real aufs kernel: nothing by this project (no machine here carries aufs).
The issue's reporter ran the conformance suite on Linux 6.1 with aufs 6.1-20240701 before
these fixes (34 passed, 5 failed: the three causes the plans, filters and flush above
address); mounts, branch options, whiteouts and bookkeeping names were seen working
there. Not verified on aufs: the one-branch read-only view, the ``remount,append:``
steps, and the pseudo-link flush (checked here only against plain directories and a
stand-in for the maintenance file); pseudo-links left by a crash before the flush are
not repaired. ``tests/drivers/test_aufs.py`` holds the host-side checks.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from csi.errors import IncompatibleFilesystem, NotSupported
from csi.graphdriver.diff.whiteouts import AUFS_PLINK_DIR, AUFS_WHITEOUTS, WhiteoutFormat
from csi.graphdriver.driver import Layer
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.host import mount as mnt
from csi.host.fsinfo import fstype_at, kernel_has

MAX_BRANCHES = 127
BRANCHES_PER_MOUNT = 64  # well inside the ~85 entries of aufs's one-page option table
AUFS_OPTIONS: tuple[str, ...] = ("dio", "xino=/dev/shm/aufs.xino")
PLINK_MAINT = Path("/proc/fs/aufs/plink_maint")
# aufs cannot stack on these (Docker's aufs driver refuses them too)
UNSUPPORTED_BACKING = frozenset({"aufs", "btrfs", "ecryptfs", "overlay"})


def branch_plan(branches: list[str], *, readonly: bool, cwd: str) -> tuple[mnt.Mount, ...]:
    """The mounts of one aufs view of ``branches`` (top first): a first mount with at most
    :data:`BRANCHES_PER_MOUNT` of them, then one ``remount,append:`` per further branch."""
    ro = ("ro",) if readonly else ()
    head, rest = branches[:BRANCHES_PER_MOUNT], branches[BRANCHES_PER_MOUNT:]
    first = mnt.Mount("aufs", "none", (*ro, "br:" + ":".join(head), *AUFS_OPTIONS), cwd=cwd)
    return (first, *(mnt.Mount("aufs", "none", ("remount", *ro, f"append:{b}"), cwd=cwd) for b in rest))


# ---------------------------------------------------------------------- pseudo-links


class PlinkMaint(Protocol):
    """aufs's pseudo-link maintenance mode of one mount (``/proc/fs/aufs/plink_maint``)."""

    def begin(self, si: str) -> None: ...
    def clean(self) -> None: ...
    def end(self) -> None: ...


class ProcPlinkMaint:
    """The kernel's maintenance file: write ``si=<id>`` to begin, ``clean`` to drop the
    mount's pseudo-link list; closing ends the mode."""

    def __init__(self, path: Path = PLINK_MAINT) -> None:
        self.path, self._fd = path, -1

    def begin(self, si: str) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        os.write(self._fd, f"si={si}".encode("ascii"))

    def clean(self) -> None:
        os.write(self._fd, b"clean")

    def end(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def pseudo_links(branch: Path) -> dict[int, list[Path]]:
    """The pseudo-link files of a writable branch, by the inode number (as the aufs mount
    shows it) their name starts with: ``<ino>.<n>``."""
    plnk = branch / AUFS_PLINK_DIR
    try:
        names = os.listdir(plnk)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found: dict[int, list[Path]] = {}
    for name in names:
        head, dot, _ = name.partition(".")
        if dot and head.isdigit():
            found.setdefault(int(head), []).append(plnk / name)
    return found


def copy_up_names(mountpoint: Path, inodes: Collection[int]) -> list[str]:
    """``chown(-1, -1)`` (a no-op aufs answers with a copy-up) every non-directory below
    ``mountpoint`` whose inode number is in ``inodes``, without leaving its filesystem or
    entering bookkeeping names; return those paths, relative, sorted."""
    done: list[str] = []
    if not inodes:
        return done
    root_dev = os.lstat(mountpoint).st_dev
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(mountpoint / rel if rel else mountpoint) as it:
            for entry in it:
                if AUFS_WHITEOUTS.is_bookkeeping(entry.name):
                    continue
                child = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                if st.st_dev != root_dev:
                    continue  # another mount below the view
                if stat.S_ISDIR(st.st_mode):
                    pending.append(child)
                elif st.st_ino in inodes:
                    os.chown(entry.path, -1, -1, follow_symlinks=False)
                    done.append(child)
    return sorted(done)


@dataclass(frozen=True)
class PlinkFlush:
    """What one flush did: the names copied up and the pseudo-link files removed."""

    copied_up: tuple[str, ...]
    removed: tuple[Path, ...]


def flush_pseudo_links(mountpoint: Path, branch: Path, si: str, maint: PlinkMaint | None = None) -> PlinkFlush:
    """Flush the pseudo-links of the writable ``branch`` of the aufs mount at
    ``mountpoint`` (``si``: the mount's ``si=`` id), as ``auplink flush`` does."""
    if not pseudo_links(branch):
        return PlinkFlush((), ())
    maint = maint or ProcPlinkMaint()
    maint.begin(si)
    try:
        links = pseudo_links(branch)  # again, in maintenance mode: no new ones appear now
        copied = copy_up_names(mountpoint, links.keys())
        maint.clean()
        removed = [path for paths in links.values() for path in paths]
        for path in removed:
            path.unlink(missing_ok=True)
    finally:
        maint.end()
    return PlinkFlush(tuple(copied), tuple(sorted(removed)))


def mount_si(target: Path) -> str | None:
    """The ``si=`` id aufs gives the mount at ``target`` (None: not an aufs mount)."""
    found = mnt.find_mount(target)
    if found is None or found.fstype != "aufs":
        return None
    for option in (*found.super_options, *found.options):
        if option.startswith("si="):
            return option[len("si="):]
    return None


# ---------------------------------------------------------------------- the driver


class AufsDriver(OverlayDriver):
    """Layered directories mounted with aufs; see the module docstring."""

    name: ClassVar[str] = "aufs"
    whiteouts: ClassVar[WhiteoutFormat] = AUFS_WHITEOUTS
    max_chain: ClassVar[int] = MAX_BRANCHES

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        if not kernel_has("aufs"):
            raise NotSupported("aufs not in /proc/filesystems")
        fstype = fstype_at(home)
        if fstype in UNSUPPORTED_BACKING:
            raise IncompatibleFilesystem(f"aufs cannot use {fstype} at {home} as a branch filesystem")

    def _status_extra(self) -> list[tuple[str, str]]:
        return [
            ("backing filesystem", fstype_at(self.home)),
            ("mount options", ",".join(AUFS_OPTIONS)),
            ("native diff", "yes (against the layer's own parent)"),
            ("max lower layers", str(MAX_BRANCHES - 1)),
        ]

    def mount_plan(self, layer: Layer, chain: list[Layer]) -> tuple[mnt.Mount, ...]:
        if layer.frozen:
            return self._view_plan(chain)
        branches = [f"{self.layout.diff(layer.id)}=rw", *(f"{s}=ro+wh" for s in self._shorts(chain[1:]))]
        return branch_plan(branches, readonly=False, cwd=str(self.layout.links))

    def _view_plan(self, chain: list[Layer]) -> tuple[mnt.Mount, ...]:
        return branch_plan([f"{s}=ro+wh" for s in self._shorts(chain)], readonly=True, cwd=str(self.layout.links))

    def describe_mount(self, layer: Layer, chain: list[Layer]) -> mnt.Mount:
        """The first mount of :meth:`mount_plan` (the whole plan for chains that fit one)."""
        return self.mount_plan(layer, chain)[0]

    def _settle(self, layer: Layer) -> None:
        """Flush the pseudo-links of a mounted writable layer (see the module docstring)."""
        merged = self.layout.merged(layer.id)
        si = mount_si(merged)
        if si is not None:
            flush_pseudo_links(merged, self.layout.diff(layer.id), si)
