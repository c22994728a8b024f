"""Size limits of directory-based layers (vfs, overlay, aufs) through XFS project quota.

A driver whose home is on XFS mounted with ``prjquota`` gets a :class:`LayerLimits` from
:meth:`LayerLimits.for_home`; elsewhere it gets None, records sizes without enforcing them
and says so in ``size_enforcement()`` (:func:`no_enforcement`).

Which directory carries the limit is the driver's choice (``upper``): vfs limits the whole
layer directory, overlay and aufs the upper (``diff``) directory, i.e. the bytes a volume
adds or copies up on top of its parent. ``companions`` are directories that must carry the
same project ID: overlay's work dir, because a copy-up is made there and renamed into the
upper dir, and XFS refuses a rename into a tree of another project (EXDEV).

Policy (IDs and limits are allocated by :class:`csi.graphdriver.quota.xfs.ProjectQuota`):

* a writable layer with a size has its own project ID with a hard block limit = size;
  ``apply`` on resize only moves the limit; a writable layer without size has no ID;
* frozen layers have no limit (they are read-only). A frozen layer made by renaming a
  writable layer's upper dir (overlay's O(1) freeze) keeps that directory's ID as an
  accounting ID with the limit cleared (``hand_over``): re-tagging its files would make the
  freeze cost O(files); the writable layer gets a fresh ID on its new, empty upper dir;
* removing a layer releases its ID (``release``) after its directory is gone.

Content must be born in its project where possible: XFS refuses to rename or hard-link an
inode of another project into a tagged tree (EXDEV), and symlinks and device nodes cannot
be re-tagged afterwards (no file descriptor to set the ID through). So overlay tags the
empty upper dir at create, and vfs copies a child's content into a tagged staging dir
(``stage``, then ``settle`` once renamed). Only a layer that gets its *first* size later,
by ``resize``, has existing content re-tagged, and the symlinks and special files it
already holds stay outside the project (a few bytes each; renaming one inside the layer
then fails with EXDEV, which ``mv`` handles by copying).

Crash safety: the drivers call ``apply`` while the layer record still says ``creating`` (a
crash rolls the layer back, and its ``_destroy`` releases the ID) or, on resize, before the
record's size changes. :meth:`LayerLimits.reconcile` runs after the driver's start-up
reconciliation and makes the quota records agree with the committed layer records: every
ready writable layer with a size carries its ID and limit (re-applied if a crash left them
behind), and every record that belongs to no layer is released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from csi.graphdriver.driver import Layer, LayerState
from csi.graphdriver.quota.xfs import ProjectQuota, ProjectUsage, get_project, prjquota_mount, set_project_tree

ENFORCEMENT = "xfs project quota"


def no_enforcement(fstype: str, home: Path) -> str:
    """The ``size_enforcement()`` line of a driver whose home has no project quota."""
    if fstype == "xfs" and prjquota_mount(home) is None:
        return "none (no project quota on xfs: the filesystem is not mounted with prjquota)"
    return f"none (no project quota on {fstype})"


def _no_companions(layer_id: str) -> Sequence[Path]:
    return ()


@dataclass
class LayerLimits:
    """Project IDs and limits for the layers of one driver home (see module docstring)."""

    quota: ProjectQuota
    upper: Callable[[str], Path]
    companions: Callable[[str], Sequence[Path]] = field(default=_no_companions)

    @classmethod
    def for_home(cls, home: Path, upper: Callable[[str], Path],
                 companions: Callable[[str], Sequence[Path]] = _no_companions) -> LayerLimits | None:
        quota = ProjectQuota.for_home(home)
        return None if quota is None else cls(quota, upper, companions)

    def describe(self, what: str) -> str:
        return f"{ENFORCEMENT} (hard limit on {what})"

    def apply(self, layer_id: str, size_bytes: int | None) -> None:
        """Limit writable layer ``layer_id`` to ``size_bytes`` (None or 0: no limit)."""
        upper = self.upper(layer_id)
        if not size_bytes:
            self.quota.release(upper)
            return
        self._tag_companions(layer_id, self.quota.resize(upper, size_bytes))

    def stage(self, staging: Path, size_bytes: int) -> None:
        """Give an empty staging directory a layer's ID and limit before its content is made
        inside it (every inode is then born in the project); :meth:`settle` follows."""
        self.quota.assign(staging, size_bytes)

    def settle(self, layer_id: str, size_bytes: int) -> None:
        """The content made under a staging directory was renamed to ``layer_id``'s upper
        dir: record the ID there, limited to ``size_bytes`` (idempotent)."""
        self.quota.adopt(self.upper(layer_id), size_bytes)

    def release_staging(self, staging: Path) -> None:
        self.quota.release(staging)

    def hand_over(self, frozen_id: str) -> None:
        """A writable layer's upper dir became frozen layer ``frozen_id``'s: its ID follows
        the directory, without a limit (idempotent)."""
        self.quota.adopt(self.upper(frozen_id), 0)

    def release(self, layer_id: str) -> None:
        self.quota.release(self.upper(layer_id))

    def usage(self, layer_id: str) -> ProjectUsage | None:
        """What the layer's project is charged, if it has one."""
        upper = self.upper(layer_id)
        return self.quota.usage(upper) if upper.is_dir() else None

    def _tag_companions(self, layer_id: str, project_id: int) -> None:
        for path in self.companions(layer_id):
            if path.is_dir() and get_project(path) != project_id:
                set_project_tree(path, project_id)

    def reconcile(self, layers: Iterable[Layer]) -> None:
        """Make the quota records agree with the committed layers (start-up, cleanup)."""
        keep: set[str] = set()
        for layer in layers:
            upper = self.upper(layer.id)
            if layer.state is not LayerState.READY or not upper.is_dir():
                continue
            if layer.frozen:
                keep.add(self.quota.key(upper))  # an ID handed over by a freeze (no limit)
            elif layer.size_bytes:
                self._tag_companions(layer.id, self.quota.ensure(upper, layer.size_bytes))
                keep.add(self.quota.key(upper))
        for key in self.quota.assigned():
            if key not in keep:
                self.quota.release(self.quota.home / key)

    def status(self) -> list[tuple[str, str]]:
        return [("xfs project ids in use", str(len(self.quota.assigned())))]
