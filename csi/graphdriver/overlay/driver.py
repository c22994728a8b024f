"""The overlay driver: layers as directories, writable layers mounted as overlayfs.

On-disk layout: :mod:`csi.graphdriver.overlay.layout` (``layers/<id>/{diff,work,merged,link,lower}``,
``l/<short>`` links). The records (:mod:`csi.graphdriver.metastore`) are the truth about
parents; the ``lower`` files are written for inspection only.

Views (``get``):

* writable layer: ``overlay lowerdir=<parent shorts>,upperdir=diff,workdir=work`` at
  ``merged``; a layer without parent uses ``<home>/empty`` as its single lower, so every
  writable layer behaves the same (deletions, whiteouts, freezes).
* frozen layer: read-only ``overlay lowerdir=<own short>:<parent shorts>``; a frozen layer
  without parent is a read-only bind mount of its diff dir (overlay needs two lowers
  when it has no upper).

A view is a *mount plan* (:meth:`OverlayDriver.mount_plan`, data): the mounts performed in
order at one target, undone if a step fails. Overlay's plans have one mount; aufs's add
``remount,append:`` steps (:mod:`csi.graphdriver.overlay.aufs`). Before a mounted
writable layer's diff dir is read (a freeze, a native diff) and before its view is
unmounted, the driver *settles* it (:meth:`OverlayDriver._settle`: nothing for overlay,
whose upper dir always is the whole change; aufs flushes its pseudo-links).

Overlay options, always passed: ``index=off`` (freezing rebases upper dirs onto new lowers,
which the index would reject), ``redirect_dir=off`` (renaming a directory that comes from
a lower fails with EXDEV and tools fall back to copying, so an upper dir never holds
redirects and the native diff is exact), ``metacopy=off`` (every copied-up file carries
its data, so the upper dir is a complete diff), ``xino=off`` (plain inode numbers).
Lowers are short names relative to ``<home>/l`` (the mount's ``cwd``; ``csi.host.mount``
changes the process's working directory for the call, so this driver's mounts are
serialized by a lock); beyond one page
``csi.host.mount`` uses ``fsconfig(lowerdir+)``, so chains reach the kernel's 500 lowers.
A chain (a layer and its ancestors) is at most ``max_chain`` = 500 layers; ``create``
beyond it raises OutOfRange.

Freeze (a snapshot of writable layer S into frozen layer F):

* S not mounted — O(1): S's diff dir is renamed to become F's diff (F.parent = S.parent),
  S gets a fresh empty diff dir (same root mode, owner, times) and is rebased onto F.
* S mounted (or already as deep as a chain may be, ``max_chain``) — cost of the bytes S
  changed since its last mounted freeze (:mod:`csi.graphdriver.overlay.upperdelta`); S keeps
  its parent. The first such freeze copies S's upper dir into F (extents cloned where
  the filesystem can, e.g. btrfs), parent S.parent, and writes ``layers/<F>/upper-index``
  (a fingerprint of every upper inode). A later one, while that index still fits
  (same S record, parent, upper dir and boot; the layer it names still ready, hidden
  counts), makes F a child of that freeze holding only the entries whose inode changed,
  new ones, and whiteouts for the ones gone. Up to ``max_delta_depth`` (32) freezes
  stack so before a full copy starts over; a change no layer on top can express (rare:
  see upperdelta) also means a full copy. The copy reads the live upper dir: every
  file is copied as it is at that moment (overlay
  copy-ups are atomic renames from the work dir), but files written during the copy are
  not frozen together; quiesce the application for a multi-file consistent snapshot.
  Each copied file and directory, and the index, is fsynced before the freeze is committed.
  A stacked snapshot keeps the one below it on disk (hidden) until it is removed itself.
  aufs (its own whiteout form) always copies in full.

Crash safety of freeze: the mode (``rename`` / ``copy``) is recorded in F's record before
any disk work. Recovery: rename mode — F's diff exists means the rename happened: finish
(the diff's project ID moves to F, S gets its fresh diff and ID) and commit; otherwise
roll back. Copy mode (``copy``, or ``delta`` when F was recorded as a child of S's last
mounted freeze, under that layer's lock) — the copy and the index are made at
``diff.copy`` / ``upper-index`` and the copy is renamed to ``diff`` only when both are
complete: ``diff`` exists means commit, otherwise roll back (a hidden layer F stacked on
is then freed). S's content is never deleted by either path.

Size: on a home on XFS mounted with ``prjquota`` (:mod:`csi.graphdriver.quota.limits`),
a writable layer created with a size gets its own XFS project ID on its ``diff`` dir (and
its ``work`` dir, where overlay prepares copy-ups) with a hard block limit of that size:
the limit covers what the layer adds on top of its parent, copy-ups of lower files
included, not the parent's content. ``resize`` raises the limit; removal releases the ID.
Frozen layers have no limit: an O(1) freeze hands the renamed diff dir's ID over to the
frozen layer as an accounting ID with the limit cleared (re-tagging would cost O(files)),
and the writable layer gets a fresh ID on its new, empty diff dir, so after a snapshot a
volume may again write its size on top of it; a copying freeze leaves the copy untagged.
Elsewhere sizes are recorded but not enforced, and ``status`` says so.

Native diff: ``diff``/``changes``/``apply_diff``/``diff_size`` of a layer against its own
parent read or write the diff dir directly (:mod:`csi.graphdriver.overlay.upperdiff`, over
the one OCI codec :mod:`csi.graphdriver.diff.ocitar`); other parents, and ``apply_diff``
onto a mounted layer, use the naive differ. Whiteout forms: :mod:`csi.graphdriver.diff.whiteouts`.

Crash tests kill the process at named steps of a freeze by wrapping the methods that end
them (``Layout.make``, ``_finish_rename``, ``_fresh_diff``, ``UpperIndex.write``,
``_freeze_by_copy``) from outside; nothing here knows of them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, ClassVar

from csi.errors import Busy, IncompatibleFilesystem, NotSupported, OutOfRange
from csi.graphdriver.diff.whiteouts import OVERLAY_WHITEOUTS, WhiteoutFormat, is_private_xattr
from csi.graphdriver.driver import Change, Layer, LayerState
from csi.graphdriver.layered import LayerDriver
from csi.graphdriver.overlay import upperdelta, upperdiff
from csi.graphdriver.overlay.layout import Layout, link_target
from csi.graphdriver.quota.limits import LayerLimits, no_enforcement
from csi.host import mount as mnt
from csi.host.fsinfo import existing_ancestor, fsync_dir, fstype_at, kernel_has
from csi.host.treecopy import copy_metadata, remove_tree

log = logging.getLogger(__name__)
OVERLAY_OPTIONS: tuple[str, ...] = ("index=off", "redirect_dir=off", "metacopy=off", "xino=off")
_EMPTY_LOWER = "../empty"  # relative to <home>/l


class OverlayDriver(LayerDriver):
    """Layers as directories; see the module docstring."""

    name: ClassVar[str] = "overlay"
    whiteouts: ClassVar[WhiteoutFormat] = OVERLAY_WHITEOUTS
    max_chain: ClassVar[int] = 500  # layers in one view: the kernel's limit of lowers
    max_delta_depth: ClassVar[int] = 32  # incremental mounted freezes stacked before a full copy
    trust_margin_ns: int = upperdelta.TRUST_MARGIN_NS  # tests lower it (see upperdelta)
    record_after_make: ClassVar[bool] = True  # a half-made layers/<id> is an orphan reconcile removes

    # ------------------------------------------------------------------ support

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        if not kernel_has("overlay"):
            raise NotSupported("overlay not in /proc/filesystems")
        cls._probe_upper(home)

    @classmethod
    def _probe_upper(cls, home: Path) -> None:
        """Mount a tiny overlay on the home's filesystem (like Docker's supportsOverlay).

        ``volatile`` first (kernel 5.10+; the probe is thrown away): unmounting an overlay
        otherwise syncs its whole upper filesystem, which takes seconds at start-up on a node
        whose other tenants have much unwritten data. Without it if the kernel refuses it."""
        base = existing_ancestor(home)
        probe = Path(tempfile.mkdtemp(prefix=".strata-overlay-probe-", dir=base))
        try:
            for sub in ("lower", "upper", "work", "merged"):
                (probe / sub).mkdir()
            options = (f"lowerdir={probe / 'lower'}", f"upperdir={probe / 'upper'}", f"workdir={probe / 'work'}",
                       *OVERLAY_OPTIONS)
            try:
                mnt.mount(mnt.Mount("overlay", "overlay", (*options, "volatile")), probe / "merged")
            except mnt.MountError:
                try:
                    mnt.mount(mnt.Mount("overlay", "overlay", options), probe / "merged")
                except mnt.MountError as exc:
                    fstype = fstype_at(base)
                    raise IncompatibleFilesystem(
                        f"overlay cannot use {fstype} at {base} for upper dirs: {exc}") from exc
            mnt.unmount(probe / "merged")
        finally:
            for mp in mnt.mounts_under(probe):
                mnt.unmount(mp.target, detach=True)
            remove_tree(probe)

    def _setup(self) -> None:
        # csi.host.mount resolves relative lower paths by changing the process's working
        # directory for the mount call: mounts of this driver must not overlap.
        self._mount_guard = threading.Lock()
        self._short_names: dict[str, str] = {}
        self.layout = Layout(self.home)
        self.layout.prepare()
        self._links_at_start: dict[str, str] | None = self.layout.sweep()  # for _repair_lost, then dropped
        self.limits = LayerLimits.for_home(self.home, upper=self.layout.diff,
                                           companions=lambda layer_id: (self.layout.work(layer_id),))
        mounted = self.layout.mounted()  # one read of the mount table, not one per layer
        for layer_id in sorted(mounted):  # a get that died before counting its mount
            layer = self.store.get(layer_id)
            if layer is not None and layer.mounts == 0:
                mnt.unmount(self.layout.merged(layer_id), detach=True)

    def size_enforcement(self) -> str:
        if self.limits is not None:
            return self.limits.describe("each writable layer's upper dir: what it adds or copies up")
        return no_enforcement(fstype_at(self.home), self.home)

    def _set_size(self, layer: Layer, size_bytes: int) -> None:
        if self.limits is None:
            return super()._set_size(layer, size_bytes)
        self.limits.apply(layer.id, size_bytes)

    def _usage(self, layer: Layer) -> int | None:
        usage = self.limits.usage(layer.id) if self.limits is not None and not layer.frozen else None
        return None if usage is None else usage.used_bytes

    def _repair_lost(self, records: list[Layer]) -> None:
        """A new writable layer's directories, link file and ``l/`` symlink are not fsynced
        (an fsync each would double a create's cost; on ext4 the journal commits them with the
        record's own sync, elsewhere a power cut may drop them). What is lost is made again:
        a writable layer without its directory was empty when acknowledged (any data an
        application fsynced into it made its directories durable too), and a lost link is
        derived from the ID (:func:`csi.graphdriver.overlay.layout.derived_short`). What exists
        comes from one ``listdir`` of ``layers/``, the links the start-up sweep read in ``l/``,
        and a ``stat`` of each link file (read only when its link does not confirm it:
        :meth:`csi.graphdriver.overlay.layout.Layout.repair`)."""
        lay = self.layout
        dirs = set(os.listdir(lay.layers))
        links, self._links_at_start = self._links_at_start, None
        if links is None:  # a later reconcile (cleanup)
            links = lay.read_links()
        for layer in records:
            if layer.state is not LayerState.READY:
                continue
            if layer.id not in dirs:
                if layer.frozen:
                    continue
                log.warning("%s: layer %s lost its directories in a power cut; making them again",
                            self.name, layer.id)
                lowers = self._shorts(self.chain(layer.parent)) if layer.parent else []
                links[lay.make(layer.id, writable=True, lowers=lowers)] = link_target(layer.id)
                if self.limits is not None:
                    self.limits.apply(layer.id, layer.size_bytes)
            elif lay.repair(layer.id, links):
                log.warning("%s: layer %s lost its short-name link in a power cut; made again", self.name, layer.id)

    def _after_sweep(self, records: list[Layer]) -> None:
        if self.limits is not None:
            self.limits.reconcile(records)

    def _status_extra(self) -> list[tuple[str, str]]:
        return [
            ("backing filesystem", fstype_at(self.home)),
            ("mount options", ",".join(OVERLAY_OPTIONS)),
            ("native diff", "yes (against the layer's own parent)"),
            ("max lower layers", "500"),
            *(self.limits.status() if self.limits else []),
        ]

    # ------------------------------------------------------------------ layers on disk

    def _shorts(self, chain: list[Layer]) -> list[str]:
        """Short names of ``chain`` (a layer's short name never changes: cached)."""
        names = []
        for layer in chain:
            short = self._short_names.get(layer.id)
            if short is None:
                short = self._short_names[layer.id] = self.layout.short(layer.id)
            names.append(short)
        return names

    def _make(self, layer: Layer, parent: Layer | None) -> None:
        lowers = self._shorts(self.chain(parent.id)) if parent else []
        if len(lowers) + 1 > self.max_chain:
            raise OutOfRange(f"{self.name} layers stack at most {self.max_chain} deep; "
                             f"layer {layer.id} would be {len(lowers) + 1}")
        self.layout.make(layer.id, writable=True, lowers=lowers)
        if self.limits is not None:
            self.limits.apply(layer.id, layer.size_bytes)

    def _destroy(self, layer_id: str) -> None:
        self._short_names.pop(layer_id, None)
        self.layout.destroy(layer_id)
        if self.limits is not None:  # after the files are gone: nothing is charged to the ID any more
            self.limits.release(layer_id)

    def _on_disk(self) -> set[str]:
        return self.layout.on_disk()

    def _path(self, layer: Layer) -> Path:
        return self.layout.merged(layer.id)

    # ------------------------------------------------------------------ views

    def describe_mount(self, layer: Layer, chain: list[Layer]) -> mnt.Mount:
        """The mount that shows ``layer`` (``chain`` = layer, parent, ...), as data."""
        lay = self.layout
        if not layer.frozen:
            lowers = self._shorts(chain[1:]) or [_EMPTY_LOWER]
            return mnt.Mount("overlay", "overlay", (
                "lowerdir=" + ":".join(lowers), f"upperdir={lay.diff(layer.id)}",
                f"workdir={lay.work(layer.id)}", *OVERLAY_OPTIONS), cwd=str(lay.links))
        return self._describe_view(chain)

    def _describe_view(self, chain: list[Layer]) -> mnt.Mount:
        """Read-only view of a chain of frozen layers."""
        if len(chain) == 1:
            return mnt.Mount("none", str(self.layout.diff(chain[0].id)), ("bind", "ro"))
        return mnt.Mount("overlay", "overlay", (
            "ro", "lowerdir=" + ":".join(self._shorts(chain)), *OVERLAY_OPTIONS), cwd=str(self.layout.links))

    def mount_plan(self, layer: Layer, chain: list[Layer]) -> tuple[mnt.Mount, ...]:
        """The mounts that show ``layer``, performed in this order at one target (overlay:
        one; aufs: a first batch of branches and ``remount,append:`` steps)."""
        return (self.describe_mount(layer, chain),)

    def _view_plan(self, chain: list[Layer]) -> tuple[mnt.Mount, ...]:
        """The mounts of a read-only view of a chain of frozen layers."""
        return (self._describe_view(chain),)

    def _activate(self, layer: Layer, chain: list[Layer], mount_label: str) -> None:
        first, *rest = self.mount_plan(layer, chain)
        if mount_label and first.fstype == "overlay" and os.path.isdir("/sys/fs/selinux"):
            first = mnt.Mount(first.fstype, first.source, (*first.options, f'context="{mount_label}"'), first.cwd)
        self._mount((first, *rest), self.layout.merged(layer.id))

    def _mount(self, plan: tuple[mnt.Mount, ...], target: Path) -> None:
        """Perform ``plan`` at ``target``; a step that fails undoes the ones before it."""
        with self._mount_guard:
            mnt.mount(plan[0], target)
            try:
                for step in plan[1:]:
                    mnt.mount(step, target)
            except BaseException:
                mnt.unmount(target, detach=True)
                raise

    def _settle(self, layer: Layer) -> None:
        """Bring the diff dir of writable ``layer`` in line with its view (if mounted)
        before the dir is read (freeze, native diff) or the view unmounted. Overlay:
        nothing to do (its upper dir always is the layer's whole change)."""

    def _deactivate(self, layer: Layer) -> None:
        if not layer.frozen:
            self._settle(layer)
        try:
            mnt.unmount_all(self.layout.merged(layer.id))
        except mnt.MountError as exc:
            if exc.errno == errno.EBUSY:
                raise Busy(f"layer {layer.id} is still in use at {self.layout.merged(layer.id)}") from exc
            raise

    def _is_active(self, layer: Layer) -> bool:
        return mnt.is_mount_point(self.layout.merged(layer.id))

    @contextmanager
    def lower_view(self, parent_id: str | None) -> Iterator[Path | None]:
        """A private read-only view of ``parent_id``'s full content (None: nothing)."""
        if parent_id is None:
            yield None
            return
        chain = self.chain(parent_id)
        if len(chain) == 1:
            yield self.layout.diff(parent_id)
            return
        target = Path(tempfile.mkdtemp(prefix="view-", dir=self.layout.scratch))
        try:
            self._mount(self._view_plan(chain), target)
            yield target
        finally:
            mnt.unmount(target, detach=True)
            remove_tree(target)

    # ------------------------------------------------------------------ freeze

    def _freeze(self, source: Layer, frozen: Layer) -> str | None:
        chain = self.chain(source.id)
        parent_shorts = self._shorts(chain[1:])
        self._settle(source)
        if source.mounts == 0 and len(chain) < self.max_chain:
            if self._is_active(source):
                self._deactivate(source)
            return self._freeze_by_rename(source, frozen, parent_shorts)
        return self._freeze_by_copy(source, frozen, parent_shorts)

    def _parent_shorts(self, layer: Layer) -> list[str]:
        return self._shorts(self.chain(layer.parent)) if layer.parent else []

    def _freeze_by_rename(self, source: Layer, frozen: Layer, parent_shorts: list[str]) -> str:
        self.store.update(frozen.id, extra={"freeze": "rename"})
        self.layout.make(frozen.id, writable=False, lowers=parent_shorts, with_diff=False)
        os.rename(self.layout.diff(source.id), self.layout.diff(frozen.id))
        return self._finish_rename(source, frozen, parent_shorts)

    def _finish_rename(self, source: Layer, frozen: Layer, parent_shorts: list[str]) -> str:
        """Give ``source`` a fresh, empty diff dir on top of ``frozen`` (idempotent). The
        project ID of the renamed diff moves to ``frozen`` first; ``source`` gets a new one."""
        lay = self.layout
        if self.limits is not None:
            self.limits.hand_over(frozen.id)
        target = lay.diff(source.id)
        if not target.exists():
            os.rename(self._fresh_diff(source, frozen), target)
        lay.reset_work(source.id)
        if self.limits is not None:
            self.limits.apply(source.id, source.size_bytes)
        lay.write_lower(source.id, [lay.short(frozen.id), *parent_shorts])
        fsync_dir(lay.layer_dir(source.id))
        fsync_dir(lay.layer_dir(frozen.id))
        return frozen.id

    def _fresh_diff(self, source: Layer, frozen: Layer) -> Path:
        """An empty ``diff.new`` for ``source`` with the attributes of the root of the diff
        dir it handed to ``frozen`` (its private xattrs, e.g. opacity, left behind)."""
        fresh = self.layout.layer_dir(source.id) / "diff.new"
        remove_tree(fresh)
        fresh.mkdir()
        root = self.layout.diff(frozen.id)
        copy_metadata(root, fresh, os.lstat(root), skip_xattr=is_private_xattr)
        return fresh

    def _freeze_by_copy(self, source: Layer, frozen: Layer, parent_shorts: list[str]) -> str | None:
        """Copy the upper dir, or only what changed since the last mounted freeze
        (:mod:`csi.graphdriver.overlay.upperdelta`); the index of the upper dir goes with it."""
        upper = self.layout.diff(source.id)
        entries = upperdelta.scan(upper, self.whiteouts, margin_ns=self.trust_margin_ns)
        stacked_on: Layer | None = None
        depth, delta = 0, upperdelta.full(entries)
        base = self._delta_base(source, entries)
        if base is not None:
            with self._locked(base[0].id):  # once recorded as its child, base[0] stays
                current = self.store.get(base[0].id)
                if current is not None and current.state is LayerState.READY:
                    stacked_on, depth, delta = base
                    self.store.update(frozen.id, parent=stacked_on.id, extra={"freeze": "delta"})
        if stacked_on is None:
            self.store.update(frozen.id, extra={"freeze": "copy"})
        lowers = self._shorts(self.chain(stacked_on.id)) if stacked_on is not None else parent_shorts
        self.layout.make(frozen.id, writable=False, lowers=lowers, with_diff=False)
        staging = self.layout.layer_dir(frozen.id) / "diff.copy"
        upperdelta.build(upper, staging, delta, self.whiteouts)
        st = os.lstat(upper)
        upperdelta.UpperIndex(source.id, source.created, source.parent, (st.st_dev, st.st_ino),
                              upperdelta.boot_id(), depth, entries).write(
            self.layout.layer_dir(frozen.id) / upperdelta.INDEX_NAME)
        os.rename(staging, self.layout.diff(frozen.id))
        fsync_dir(self.layout.layer_dir(frozen.id))
        return source.parent

    def _delta_base(self, source: Layer, entries: upperdelta.Tree) -> tuple[Layer, int, upperdelta.Delta] | None:
        """The last mounted freeze of ``source`` when its index still describes the upper
        dir and the new freeze may stack on it: (that layer, depth of the new one, delta)."""
        if self.whiteouts.native_oci:  # aufs: its branch semantics are not planned here
            return None
        earlier = [l for l in self.store.all()
                   if l.frozen and l.origin == source.id and l.state is LayerState.READY]
        if not earlier:
            return None
        last = max(earlier, key=lambda l: (l.created, l.id))
        index = upperdelta.UpperIndex.read(self.layout.layer_dir(last.id) / upperdelta.INDEX_NAME)
        st = os.lstat(self.layout.diff(source.id))
        if (index is None or index.source != source.id or index.source_created != source.created
                or index.parent != source.parent or index.upper != (st.st_dev, st.st_ino)
                or index.boot != upperdelta.boot_id() or index.depth + 1 > self.max_delta_depth
                or len(self.chain(last.id)) + 2 > self.max_chain):  # + the new layer + a clone of it
            return None
        try:
            with contextlib.ExitStack() as views:
                below: list[Path | None] = []

                def shown_below(rel: str) -> os.stat_result | None:
                    if not below:  # P's view is mounted only when a case needs it
                        below.append(views.enter_context(self.lower_view(source.parent)))
                    return upperdelta.lookup(below[0], rel)

                delta = upperdelta.plan(index.entries, entries, shown_below)
        except upperdelta.NotIncremental:
            return None
        return last, index.depth + 1, delta

    def _recover_freeze(self, source: Layer, frozen: Layer) -> str | None | bool:
        mode = frozen.extra.get("freeze")
        frozen_diff = self.layout.diff(frozen.id)
        if mode == "rename" and frozen_diff.is_dir():
            return self._finish_rename(source, frozen, self._parent_shorts(source))
        if mode in ("copy", "delta") and frozen_diff.is_dir():
            return source.parent
        return False

    # ------------------------------------------------------------------ native diff

    def _native(self, layer_id: str, parent: str | None) -> Layer | None:
        """The layer when a diff against ``parent`` can be read from its diff dir (settled
        first if it is a mounted writable layer)."""
        layer = self._visible(layer_id)
        if parent != layer.parent:
            return None
        if not layer.frozen:
            self._settle(layer)
        return layer

    def diff(self, layer_id: str, parent: str | None = None) -> IO[bytes]:
        layer = self._native(layer_id, parent)
        if layer is None:
            return super().diff(layer_id, parent)
        return upperdiff.diff_stream(self.layout.diff(layer.id), self.whiteouts)

    def changes(self, layer_id: str, parent: str | None = None) -> list[Change]:
        layer = self._native(layer_id, parent)
        if layer is None:
            return super().changes(layer_id, parent)
        with self._locked(layer_id), self.lower_view(layer.parent) as below:
            return upperdiff.layer_changes(self.layout.diff(layer.id), below, self.whiteouts)

    def diff_size(self, layer_id: str, parent: str | None = None) -> int:
        layer = self._native(layer_id, parent)
        if layer is None:
            return super().diff_size(layer_id, parent)
        return upperdiff.diff_size(self.layout.diff(layer.id), self.whiteouts)

    def apply_diff(self, layer_id: str, parent: str | None, stream: IO[bytes]) -> int:
        layer = self._visible(layer_id)
        if parent != layer.parent or layer.frozen or layer.mounts > 0:
            return super().apply_diff(layer_id, parent, stream)
        with self._locked(layer_id), self.lower_view(layer.parent) as below:
            if self.store.require(layer_id).mounts > 0:
                return super().apply_diff(layer_id, parent, stream)
            return upperdiff.apply_layer_tar(self.layout.diff(layer.id), below, self.whiteouts, stream)
