"""Group commit for the sqlite3 databases (WAL journal) of the layer records and the CSI state.

Contract: a write committed through a connection opened by :func:`open_wal_database` is
durable (survives a power cut) once :meth:`WalSync.wait` for its sequence number returns;
it survives ``kill -9`` as soon as ``COMMIT`` returns (the WAL frames are in the kernel).
Callers acknowledge nothing before ``wait`` returns, so durability is that of
``synchronous=FULL`` — but the fsyncs are shared: the connection runs with
``synchronous=NORMAL`` (sqlite writes each commit's frames to the WAL without syncing it,
and syncs WAL and database itself around checkpoints), and ``wait`` runs one
``fdatasync`` of the ``-wal`` file for every commit made before it started. Threads that
commit while a sync is running wait for it and then share the next one, so N concurrent
callers pay about two syncs, not N. A failed sync is reported to every waiter of that
sync and to all later ones (after an fsync error the kernel may have dropped the dirty
pages: nothing written since can be called durable).

Readers use the same rule: a read's sequence number is the latest commit it could see,
so nothing a caller reports was read from a commit that is not yet durable (a read
with no commit pending, or one that found nothing, returns at once).

:meth:`WalSync.sync_soon` hands the same sync to a background thread (one per database), so a
caller that must make two databases durable syncs both at once: ``sync_soon`` on one, its
other work and the other's ``wait``, then ``wait`` on the first.

The ``-wal`` file's directory entry is synced the first time a ``-wal`` inode is seen
(sqlite does the same for a new journal), so a freshly created WAL cannot vanish with
the commits in it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

from csi.errors import StrataError


def open_wal_database(path: Path, schema: str, *, timeout: float = 5.0) -> sqlite3.Connection:
    """Connect (autocommit, usable from any thread; callers serialize access), switch to
    WAL, create ``schema`` with full syncs, then relax the connection to ``synchronous=NORMAL``
    for :class:`WalSync`."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class WalSync:
    """Shared fdatasync of one database's ``-wal`` file (see the module docstring).

    ``note(db)`` is called with the connection's lock held right after a statement or
    ``COMMIT`` outside an explicit transaction; it returns the sequence number to pass
    to ``wait`` once the lock is released.
    """

    def __init__(self, db: sqlite3.Connection, db_path: Path) -> None:
        self.wal = Path(str(db_path) + "-wal")
        self._cond = threading.Condition()
        self._changes = db.total_changes  # the connection's total_changes at the last note
        self._committed = 0  # commits noted so far
        self._synced = 0  # commits known durable
        self._syncing = False
        self._failed: OSError | None = None
        self._wal_inode: tuple[int, int] | None = None
        self._wanted = 0  # commits sync_soon asked the flusher thread to make durable
        self._flusher: threading.Thread | None = None
        self._sync_wal()  # the schema and the WAL file itself, before anything is acknowledged

    def note(self, db: sqlite3.Connection, *, found: bool = True) -> int:
        """The sequence number a caller waits for. ``found``: the statement returned rows;
        a read that found nothing waits for nothing (0): under the stores' forget-first
        protocols absence is never an undurable state (a record is marked ``removing``,
        durably, before it is deleted, and a deleted intent record is rolled back anyway)."""
        changes = db.total_changes
        with self._cond:
            if changes != self._changes:
                self._changes = changes
                self._committed += 1
            elif not found:
                return 0
            return self._committed

    def sync_soon(self, seq: int) -> None:
        """Start making commits up to ``seq`` durable in a background thread (this store's
        flusher), so a caller can do other work (another database's sync) and ``wait`` later."""
        with self._cond:
            if self._synced >= seq or self._failed is not None:
                return
            self._wanted = max(self._wanted, seq)
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name=f"walsync-{self.wal.name}",
                                                 daemon=True)
                self._flusher.start()
            self._cond.notify_all()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while self._wanted <= self._synced or self._syncing or self._failed is not None:
                    self._cond.wait()
                self._syncing = True
                target = self._committed
            try:
                self._lead(target)
            except StrataError:
                pass  # recorded in _failed: every waiter raises it

    def wait(self, seq: int) -> None:
        """Return once commits up to ``seq`` are on stable storage (one shared sync)."""
        with self._cond:
            while True:
                if self._failed is not None:
                    raise StrataError(f"cannot make {self.wal} durable: {self._failed}") from self._failed
                if self._synced >= seq:
                    return
                if not self._syncing:
                    break
                self._cond.wait()
            self._syncing = True
            target = self._committed
        self._lead(target)

    def _lead(self, target: int) -> None:
        """Sync for everyone (``_syncing`` is set by the caller): commits up to ``target``."""
        try:
            self._sync_wal()
        except OSError as exc:
            with self._cond:
                self._failed = exc
                self._syncing = False
                self._cond.notify_all()
            raise StrataError(f"cannot make {self.wal} durable: {exc}") from exc
        with self._cond:
            self._synced = max(self._synced, target)
            self._syncing = False
            self._cond.notify_all()

    def _sync_wal(self) -> None:
        try:
            fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no WAL (yet): everything committed is in the database file
            return
        try:
            os.fdatasync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        inode = (st.st_dev, st.st_ino)
        if inode != self._wal_inode:
            dir_fd = os.open(self.wal.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._wal_inode = inode


__all__ = ["WalSync", "open_wal_database"]


def read_only_uri(db: Path) -> str:
    """A read-only sqlite URI for ``db`` that creates nothing: with no ``-wal`` beside it no
    writer is open (a writer in WAL mode keeps one) and everything is in the main file, which
    is read as immutable (a plain ``mode=ro`` open would create the ``-wal``/``-shm`` files);
    with a ``-wal``, a ``mode=ro`` reader joins the writer's shared index, which exists."""
    wal = db.with_name(db.name + "-wal")
    return f"file:{db}?mode=ro" + ("" if wal.exists() else "&immutable=1")
