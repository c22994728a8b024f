"""Group commit (csi.host.walsync) on real sqlite databases: every commit is on disk once its
wait returns, concurrent commits share syncs, a failed sync fails every later wait, and the
two stores built on it keep their records across a reopen."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import StrataError
from csi.graphdriver.driver import Layer, LayerKind, LayerState
from csi.graphdriver.metastore import LayerStore
from csi.state.store import Publication, RecordState, StateStore, VolumeRecord
from csi.host.walsync import WalSync, open_wal_database

SCHEMA = "CREATE TABLE IF NOT EXISTS t(k TEXT PRIMARY KEY, v INTEGER);"


class CountingSync(WalSync):
    """A WalSync that counts its real fdatasyncs (the sync itself is not replaced)."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.syncs = 0
        super().__init__(db, path)

    def _sync_wal(self) -> None:
        self.syncs += 1
        super()._sync_wal()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, CountingSync]]:
    path = tmp_path / "x.db"
    db = open_wal_database(path, SCHEMA)
    try:
        yield db, CountingSync(db, path)
    finally:
        db.close()


def test_connection_is_wal_with_normal_sync(tmp_path: Path) -> None:
    db = open_wal_database(tmp_path / "x.db", SCHEMA)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: WalSync syncs
    finally:
        db.close()


def test_concurrent_commits_share_syncs_and_all_survive(database: tuple[sqlite3.Connection, CountingSync],
                                                        tmp_path: Path) -> None:
    db, sync = database
    lock = threading.Lock()
    start = threading.Barrier(8)
    per_thread = 40

    def writer(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            with lock:
                db.execute("INSERT INTO t VALUES (?, ?)", (f"{n}-{i}", i))
                seq = sync.note(db)
            sync.wait(seq)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    before = sync.syncs
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commits = 8 * per_thread
    assert 0 < sync.syncs - before < commits, "eight writers should share fdatasyncs"
    again = sqlite3.connect(tmp_path / "x.db")
    try:
        assert again.execute("SELECT count(*) FROM t").fetchone()[0] == commits
    finally:
        again.close()


def test_reads_wait_only_for_what_they_could_see(database: tuple[sqlite3.Connection, CountingSync]) -> None:
    db, sync = database
    db.execute("INSERT INTO t VALUES ('a', 1)")
    seq = sync.note(db)  # committed, not yet waited for
    db.execute("SELECT v FROM t WHERE k='zzz'").fetchall()
    assert sync.note(db, found=False) == 0  # found nothing: nothing to wait for
    rows = db.execute("SELECT v FROM t WHERE k='a'").fetchall()
    read_seq = sync.note(db, found=bool(rows))
    assert read_seq == seq  # a read that found rows waits for the commit it saw
    synced = sync.syncs
    sync.wait(read_seq)
    assert sync.syncs == synced + 1
    sync.wait(seq)  # already durable: no second sync
    assert sync.syncs == synced + 1


def test_a_failed_sync_fails_every_later_wait(database: tuple[sqlite3.Connection, CountingSync],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """fdatasync cannot be made to fail on a healthy disk: the EIO is injected (a fake)."""
    db, sync = database
    db.execute("INSERT INTO t VALUES ('a', 1)")
    seq = sync.note(db)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StrataError, match="durable"):
        sync.wait(seq)
    monkeypatch.undo()
    db.execute("INSERT INTO t VALUES ('b', 2)")
    with pytest.raises(StrataError, match="durable"):
        sync.wait(sync.note(db))


def test_stores_keep_records_across_reopen(tmp_path: Path) -> None:
    layers = LayerStore(tmp_path)
    layers.insert(Layer(id="l1", parent=None, kind=LayerKind.WRITABLE, state=LayerState.READY))
    with layers.transaction():
        layers.update("l1", mounts=2)
    assert layers.require("l1").mounts == 2
    layers.close()
    state = StateStore(tmp_path)
    state.add_volume(VolumeRecord(layer="l1", name="n1", capacity=1, state=RecordState.READY))
    with state.transaction():
        state.set_volume("l1", capacity=5)
    state.close()
    reopened_layers, reopened_state = LayerStore(tmp_path), StateStore(tmp_path)
    try:
        assert reopened_layers.require("l1").mounts == 2
        volume = reopened_state.volume("l1")
        assert volume is not None and volume.capacity == 5
    finally:
        reopened_layers.close()
        reopened_state.close()


class ThreadRecordingSync(WalSync):
    """A WalSync that notes which thread ran each real fdatasync."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.threads: list[str] = []
        super().__init__(db, path)

    def _sync_wal(self) -> None:
        self.threads.append(threading.current_thread().name)
        super()._sync_wal()


def test_sync_soon_syncs_in_the_background_and_wait_shares_it(tmp_path: Path) -> None:
    """What CreateVolume relies on to sync two databases at once: after ``sync_soon`` the
    store's flusher thread makes the commit durable by itself; the caller's ``wait`` then finds
    it done and runs no sync of its own."""
    path = tmp_path / "x.db"
    db = open_wal_database(path, SCHEMA)
    try:
        sync = ThreadRecordingSync(db, path)
        sync.threads.clear()  # the constructor's own sync of the schema
        db.execute("INSERT INTO t VALUES ('a', 1)")
        seq = sync.note(db)
        sync.sync_soon(seq)
        deadline = time.monotonic() + 10  # the caller does other work meanwhile (the layer's own sync)
        while not sync.threads and time.monotonic() < deadline:
            time.sleep(0.01)
        sync.wait(seq)
        assert len(sync.threads) == 1 and sync.threads[0].startswith("walsync-"), sync.threads
        db.execute("INSERT INTO t VALUES ('b', 2)")
        sync.wait(sync.note(db))  # without sync_soon: the caller syncs itself
        assert sync.threads[-1] == threading.current_thread().name
    finally:
        db.close()


def test_publication_intent_is_committed_without_a_sync_and_made_durable_by_the_next_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Node service's intent rows (``durable=False``): no fdatasync of their own, on disk
    for a process killed with SIGKILL right after, and synced with the call's last write."""
    child = (
        "import os, signal, sys\n"
        "from csi.state.store import Publication, RecordState, StateStore\n"
        "s = StateStore(sys.argv[1])\n"
        "s.add_publication(Publication('l1', 'publish', '/t', False, (), state=RecordState.PENDING), durable=False)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "killed")], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reopened = StateStore(tmp_path / "killed")
    try:
        assert [(p.path, p.state) for p in reopened.publications()] == [("/t", RecordState.PENDING)]
    finally:
        reopened.close()

    store = StateStore(tmp_path / "live")
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    try:
        pub = store.add_publication(Publication("l1", "publish", "/t", False, (), state=RecordState.PENDING),
                                    durable=False)
        assert syncs == []
        store.set_publication(pub, RecordState.READY)  # durable: one sync covers both commits
        assert len(syncs) == 1
        store.publications()  # nothing left to sync for a reader
        assert len(syncs) == 1
    finally:
        store.close()
