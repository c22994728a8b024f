"""The aufs driver: the overlay driver's layout and freezes with aufs branch mounts.

aufs is overlay's predecessor and is absent from mainline kernels (and from this one):
:meth:`AufsDriver.check_support` raises NotSupported("aufs not in /proc/filesystems")
there, so the registry moves on. Where a kernel carries aufs, everything but the mount
comes from :class:`~csi.graphdriver.overlay.driver.OverlayDriver` (layout, O(1) and copying
freezes with their crash recovery, native diffs, and size enforcement by XFS project
quota on the rw branch, the ``diff`` dir, where the home is on XFS with ``prjquota``).

Mounts (as data, performed by :mod:`csi.host.mount`):

* writable layer: ``aufs none`` with ``br:<diff>=rw:<short1>=ro+wh:<short2>=ro+wh...``,
  ``dio``, ``xino=/dev/shm/aufs.xino`` (Docker's choice: the xino file must live on a
  filesystem aufs can write it to), lowers nearest first, named by short ``l/`` links
  relative to the mount's working directory ``<home>/l``;
* frozen layer: the same with only ``=ro+wh`` branches and ``ro``; a frozen layer without
  parent is a read-only bind mount of its diff dir.

Whiteouts are aufs's own, which already are the OCI form: ``.wh.NAME`` files, a
``.wh..wh..opq`` file in an opaque directory; ``.wh..wh.plnk`` / ``.wh..wh.orph`` /
``.wh..wh.aufs`` are aufs's bookkeeping and are never part of a diff.

Chain limit: aufs is built with at most 127 branches by default (CONFIG_AUFS_BRANCH_MAX_127),
so a layer may have at most :data:`MAX_BRANCHES` layers in its chain (upper included);
``create`` beyond that raises OutOfRange, and a freeze that would rebase a layer past it
copies instead. 127 short branches fit one page, so no ``append:`` remounts are needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from csi.host import mount as mnt
from csi.errors import IncompatibleFilesystem, NotSupported
from csi.graphdriver.driver import Layer
from csi.graphdriver.overlay.layout import AUFS_WHITEOUTS, WhiteoutFormat
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.host.fsinfo import fstype_at, kernel_has

MAX_BRANCHES = 127
AUFS_OPTIONS: tuple[str, ...] = ("dio", "xino=/dev/shm/aufs.xino")
# aufs cannot stack on these (Docker's aufs driver refuses them too)
UNSUPPORTED_BACKING = frozenset({"aufs", "btrfs", "ecryptfs", "overlay"})


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

    def describe_mount(self, layer: Layer, chain: list[Layer]) -> mnt.Mount:
        if not layer.frozen:
            branches = [f"{self.layout.diff(layer.id)}=rw", *(f"{s}=ro+wh" for s in self._shorts(chain[1:]))]
            return mnt.Mount("aufs", "none", ("br:" + ":".join(branches), *AUFS_OPTIONS), cwd=str(self.layout.links))
        return self._describe_view(chain)

    def _describe_view(self, chain: list[Layer]) -> mnt.Mount:
        if len(chain) == 1:
            return super()._describe_view(chain)
        branches = [f"{s}=ro+wh" for s in self._shorts(chain)]
        return mnt.Mount("aufs", "none", ("ro", "br:" + ":".join(branches), *AUFS_OPTIONS), cwd=str(self.layout.links))
