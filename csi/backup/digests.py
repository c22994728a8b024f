"""The diff_ids of frozen layer pairs, each computed once: :class:`Digests`.

A pair's diff_id (the sha256 of the OCI layer tar of what ``layer`` adds to ``base``) costs a
read of the layer's data, so it is kept in the export cache (:class:`ExportIndex`, keyed by
layer, base and the layer's creation time: a frozen pair's diff never changes) and computed at
most once at a time: a caller asking for a pair whose digest is being computed waits for that
computation instead of starting a second one.

``later(snapshot_id)`` queues a snapshot's chain for one background thread at low CPU and I/O
priority (nice 10, best-effort I/O level 7), so the snapshot's first cross-node restore, Diff
export or backup finds its digests cached instead of reading the data twice; CreateSnapshot
calls it after the cut. A caller that waits for a pair the background thread is hashing
lifts that thread to normal priority until the pair is done. The queue lives in memory: after
a restart a pair not done yet is computed when first asked for.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import threading

from csi.backup.export import export_chain
from csi.backup.index import ExportIndex, ExportRecord
from csi.backup.media import LAYER_TAR, LAYER_TAR_GZIP, LAYER_TAR_ZSTD
from csi.errors import StrataError
from csi.graphdriver.driver import Driver, Layer

log = logging.getLogger("strata.digests")

CHUNK = 1 << 20
NICE = 10
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_WHO_PROCESS, _IOPRIO_CLASS_BE = 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)


def _set_priority(tid: int, low: bool) -> None:
    """One thread's CPU and I/O priority: low (nice 10, best-effort level 7) or normal (nice 0,
    best-effort level 4); quietly left as it is where the kernel refuses."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, NICE if low else 0)
    except OSError:
        pass
    number = _IOPRIO_SET.get(os.uname().machine)
    if number is not None:
        try:
            _LIBC.syscall(number, _IOPRIO_WHO_PROCESS, tid,
                          (_IOPRIO_CLASS_BE << 13) | (7 if low else 4))
        except (OSError, AttributeError):
            pass


class Digests:
    """See the module docstring. ``index`` None: nothing is cached (each call hashes)."""

    def __init__(self, driver: Driver, index: ExportIndex | None) -> None:
        self.driver, self.index = driver, index
        self._running: dict[tuple[str, str | None], tuple[threading.Event, int]] = {}  # pair -> done, hasher
        self._background_tid = 0
        self._guard = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def cached(self, layer: Layer, base: Layer | None) -> ExportRecord | None:
        """The cached record of the pair's tar (its size is -1 when only a compressed blob's
        record named the diff_id)."""
        if self.index is None:
            return None
        base_id = base.id if base else None
        rec = self.index.lookup(layer.id, base_id, LAYER_TAR, layer.created)
        if rec is not None:
            return rec
        for media in (LAYER_TAR_ZSTD, LAYER_TAR_GZIP):  # a diff_id without the tar's size
            other = self.index.lookup(layer.id, base_id, media, layer.created)
            if other is not None:
                return ExportRecord(layer.id, base_id, layer.created, LAYER_TAR, other.diff_id, other.diff_id, -1)
        return None

    def remember(self, layer: Layer, base: Layer | None, media_type: str, digest: str, diff_id: str,
                 size: int, tar_size: int) -> None:
        """Record a pair's tar (and its compressed blob when ``media_type`` is not the tar)."""
        if self.index is None:
            return
        base_id = base.id if base else None
        self.index.record(ExportRecord(layer.id, base_id, layer.created, LAYER_TAR, diff_id, diff_id, tar_size))
        if media_type != LAYER_TAR:
            self.index.record(ExportRecord(layer.id, base_id, layer.created, media_type, digest, diff_id, size))

    def diff_id(self, layer: Layer, base: Layer | None) -> tuple[str, int]:
        """``(diff_id, tar size)`` of the pair: cached, or hashed once (see the module docstring)."""
        if self.index is None:
            return self._hash(layer, base, None)
        key = (layer.id, base.id if base else None)
        while True:
            rec = self.cached(layer, base)
            if rec is not None and rec.size >= 0:
                return rec.diff_id, rec.size
            with self._guard:
                entry = self._running.get(key)
                if entry is None:
                    running = threading.Event()
                    self._running[key] = (running, threading.get_native_id())
                    break
            if entry[1] == self._background_tid:
                _set_priority(entry[1], low=False)  # someone waits for it now
            entry[0].wait()  # another caller is hashing the pair: its record answers
        try:
            return self._hash(layer, base, rec)
        finally:
            with self._guard:
                self._running.pop(key, None)
            running.set()

    def _hash(self, layer: Layer, base: Layer | None, rec: ExportRecord | None) -> tuple[str, int]:
        h, size = hashlib.sha256(), 0
        raw = self.driver.diff(layer.id, base.id if base else None)
        try:
            while data := raw.read(CHUNK):
                h.update(data)
                size += len(data)
        finally:
            raw.close()
        digest = "sha256:" + h.hexdigest()
        if rec is not None and rec.diff_id != digest:
            log.warning("layer %s: diff hashes to %s, the cache said %s", layer.id, digest, rec.diff_id)
        self.remember(layer, base, LAYER_TAR, digest, digest, size, size)
        return digest, size

    # ------------------------------------------------------------------ in the background

    def later(self, snapshot_id: str) -> None:
        """Queue ``snapshot_id``'s chain for the background thread (started on first use)."""
        if self.index is None:
            return
        with self._guard:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="digests", daemon=True)
                self._worker.start()
        self._queue.put(snapshot_id)

    def _work(self) -> None:
        self._background_tid = tid = threading.get_native_id()
        while (snapshot_id := self._queue.get()) is not None:
            try:
                for layer, base_id in export_chain(self.driver, snapshot_id):
                    _set_priority(tid, low=True)
                    self.diff_id(layer, self.driver.layer(base_id) if base_id else None)
            except (StrataError, OSError) as exc:  # deleted meanwhile, or unreadable: asked again when needed
                log.info("digest of snapshot %s not computed in the background: %s", snapshot_id, exc)
            except Exception:  # noqa: BLE001 - a background nicety must not die silently
                log.exception("digest of snapshot %s failed in the background", snapshot_id)

    def close(self) -> None:
        """Stop the background thread after the pair it is on (queued ones are dropped)."""
        with self._guard:
            worker, self._worker = self._worker, None
        if worker is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        worker.join(timeout=30)


__all__ = ["Digests"]
