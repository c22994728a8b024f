"""The CSI plugin's state: volumes, snapshots and publications in one sqlite3 database.

On-disk layout: ``<root>/state.db`` (WAL journal; durability: :mod:`csi.host.walsync`)::

    volumes(layer TEXT PRIMARY KEY, name TEXT UNIQUE, capacity INTEGER, parameters TEXT,
            source_kind TEXT, source_id TEXT, base_layer TEXT, created REAL, state TEXT,
            ephemeral INTEGER, block INTEGER, mutable TEXT)
    snapshots(layer TEXT PRIMARY KEY, name TEXT UNIQUE, source_layer TEXT, size INTEGER,
              created REAL, state TEXT, group_id TEXT,
              backup_target TEXT, backup_state TEXT, backup_ref TEXT)
    transfers(name TEXT PRIMARY KEY, source_id TEXT, owner TEXT, started REAL, state TEXT)
    groups(group_id TEXT PRIMARY KEY, name TEXT UNIQUE, created REAL, state TEXT,
           members TEXT, sources TEXT)
    publications(layer TEXT, kind TEXT, path TEXT, readonly INTEGER, flags TEXT,
                 mount_group TEXT, source TEXT, state TEXT, mode INTEGER,
                 PRIMARY KEY (layer, kind, path))

``state`` follows the crash protocol of the services, which is not the same for every row:

* Volumes and snapshots made by the Controller are written once, ``ready``, *after* the
  layer work (the layer is made under a fresh random ID first): a kill before the commit
  leaves only a layer no record knows of, which start-up recovery removes.
* Publications (stage, publish) and inline ephemeral volumes are written ``pending``
  (intent) *before* the mount or layer work and become ``ready`` when it is done.
* A volume group snapshot is written ``pending`` first, naming the snapshot layers it is
  about to make (``members``, JSON list, with their ``sources``); when every member is
  frozen, the member snapshot rows (``group_id`` set) and the group's ``ready`` are one
  transaction. A kill in between leaves a ``pending`` group: recovery removes the layers
  it names and the row — all members or none.
* Any row is marked ``removing`` before its undo starts (forget first), then deleted.

* A snapshot made with a backup target (``backup_target``: ``oci://host/repo`` or
  ``oci-layout:/dir``) is ``ready`` locally at once; ``backup_state`` tells where its upload
  is (``uploading``, ``done``, ``failed``; "" for no backup) and ``backup_ref`` is the
  immutable reference (``…@sha256:…``) once ``done``. No credential is ever stored: an
  upload a restart interrupted is started again by the next CreateSnapshot (which carries
  the secrets).
* A ``transfers`` row is a content source being pulled for the CreateVolume of ``name``
  (from another node, ``owner``, or from a backup: ``owner`` "") — written before the
  first byte moves, deleted when the volume's record commits or the pull fails. The pull
  imports verified frozen layers one at a time (``oci-<ChainID>``), so a row a restart
  finds is rolled back (the row goes; layers already verified stay as the node's cache,
  a half-imported one is an ``ocitmp-`` layer the start-up sweep removes) and the repeated
  CreateVolume resumes from the first missing layer.

Start-up recovery (:mod:`csi.services.recovery`) rolls ``pending`` rows back and finishes
``removing`` ones. A publication's ``kind`` is ``stage`` (staging path) or ``publish``
(target path); ``source`` is the staging path a ``publish`` binds from (empty for inline
volumes). ``base_layer`` is the hidden frozen layer a clone was made from (recovery
removes it with a rolled-back clone). ``block`` is the access type the volume was created
for (1: volumeMode Block, a raw device; 0: a filesystem). ``mutable`` is the JSON object
of the volume's mutable parameters as last set (CreateVolume, ControllerModifyVolume).

Older databases: a ``volumes`` table from before ``block`` gets the column (0) when
opened; one from before ``parent_layer`` was dropped keeps that nullable column, which
nothing reads or writes any more (new rows leave it NULL).

This module is the only writer of the database; every method is one transaction, so
what a call returned survives ``kill -9`` and a power cut (a method returns once what it
wrote or read is on stable storage); concurrent calls share the fsyncs (group commit,
:mod:`csi.host.walsync`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from csi.errors import AlreadyExists, StrataError
from csi.host.walsync import WalSync, open_wal_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes(
    layer TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, capacity INTEGER NOT NULL,
    parameters TEXT NOT NULL, source_kind TEXT NOT NULL, source_id TEXT NOT NULL,
    base_layer TEXT, created REAL NOT NULL, state TEXT NOT NULL,
    ephemeral INTEGER NOT NULL, block INTEGER NOT NULL DEFAULT 0, mutable TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS snapshots(
    layer TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, source_layer TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, state TEXT NOT NULL, group_id TEXT NOT NULL DEFAULT '',
    backup_target TEXT NOT NULL DEFAULT '', backup_state TEXT NOT NULL DEFAULT '',
    backup_ref TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS transfers(
    name TEXT PRIMARY KEY, source_id TEXT NOT NULL, owner TEXT NOT NULL, started REAL NOT NULL,
    state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups(
    group_id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL, state TEXT NOT NULL,
    members TEXT NOT NULL, sources TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS publications(
    layer TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, readonly INTEGER NOT NULL,
    flags TEXT NOT NULL, mount_group TEXT NOT NULL, source TEXT NOT NULL, state TEXT NOT NULL,
    mode INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (layer, kind, path));
"""


class RecordState(str, Enum):
    PENDING = "pending"  # intent recorded; disk work may be half done
    READY = "ready"  # committed
    REMOVING = "removing"  # forgotten; undo may be half done


@dataclass(frozen=True)
class VolumeRecord:
    layer: str
    name: str
    capacity: int
    parameters: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    source_kind: str = ""  # "", "snapshot" or "volume"
    source_id: str = ""  # the CSI ID of the content source
    base_layer: str | None = None
    created: float = field(default_factory=time.time)
    state: RecordState = RecordState.PENDING
    ephemeral: bool = False
    block: bool = False  # created for block access (a raw device), not a filesystem
    mutable: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class SnapshotRecord:
    layer: str
    name: str
    source_layer: str
    size: int = 0
    created: float = field(default_factory=time.time)
    state: RecordState = RecordState.PENDING
    group_id: str = ""  # the volume group snapshot it belongs to ("" for none)
    backup_target: str = ""  # where its backup goes (oci://host/repo, oci-layout:/dir); "" none
    backup_state: str = ""  # "", BACKUP_UPLOADING, BACKUP_DONE, BACKUP_FAILED
    backup_ref: str = ""  # the backup's immutable reference (…@sha256:…) once done

    @property
    def ready_to_use(self) -> bool:
        """CSI's ready_to_use: the local cut exists and any backup asked for is uploaded."""
        return self.state is RecordState.READY and self.backup_state in ("", BACKUP_DONE)


BACKUP_UPLOADING = "uploading"
BACKUP_DONE = "done"
BACKUP_FAILED = "failed"


@dataclass(frozen=True)
class TransferRecord:
    """A content source being pulled for the CreateVolume of ``name`` (see the module docstring)."""

    name: str
    source_id: str
    owner: str = ""  # the node the layers come from ("" for a backup)
    started: float = field(default_factory=time.time)
    state: RecordState = RecordState.PENDING


@dataclass(frozen=True)
class GroupRecord:
    """A volume group snapshot: ``members`` are its snapshot layers, ``sources`` the volume
    layers they were taken from (same order)."""

    group_id: str
    name: str
    members: tuple[str, ...]
    sources: tuple[str, ...]
    created: float = field(default_factory=time.time)
    state: RecordState = RecordState.PENDING


@dataclass(frozen=True)
class Publication:
    layer: str
    kind: str  # "stage" or "publish"
    path: str
    readonly: bool = False
    flags: tuple[str, ...] = ()
    mount_group: str = ""
    source: str = ""
    state: RecordState = RecordState.PENDING
    mode: int = 0  # csi.v1 VolumeCapability.AccessMode.Mode (0: not recorded)


STAGE = "stage"
PUBLISH = "publish"


_STATES = {s.value: s for s in RecordState}


def _json_object(text: str | None) -> dict[str, Any]:
    """A JSON object column; the common empty one without the parser (start-up and every
    ListVolumes page read thousands of rows)."""
    return json.loads(text) if text and text != "{}" else {}


class StateStore:
    """Transactional access to ``<root>/state.db`` (thread-safe, one connection)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / "state.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = open_wal_database(self.path, _SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(volumes)")}
            # a store written before block volumes existed; a parent_layer column (dropped) stays, unused
            if "block" not in columns:
                self._db.execute("ALTER TABLE volumes ADD COLUMN block INTEGER NOT NULL DEFAULT 0")
            if "mutable" not in columns:
                self._db.execute("ALTER TABLE volumes ADD COLUMN mutable TEXT NOT NULL DEFAULT '{}'")
            snapshot_columns = {row[1] for row in self._db.execute("PRAGMA table_info(snapshots)")}
            for column in ("group_id", "backup_target", "backup_state", "backup_ref"):
                if column not in snapshot_columns:
                    self._db.execute(f"ALTER TABLE snapshots ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            if "mode" not in {row[1] for row in self._db.execute("PRAGMA table_info(publications)")}:
                self._db.execute("ALTER TABLE publications ADD COLUMN mode INTEGER NOT NULL DEFAULT 0")
            self._sync = WalSync(self._db, self.path)
        except (sqlite3.Error, OSError) as exc:
            raise StrataError(f"cannot open state store {self.path}: {exc}") from exc
        self._depth = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        """Raise if the store cannot answer (used by Probe)."""
        with self._lock:
            try:
                self._db.execute("SELECT 1").fetchone()
            except sqlite3.Error as exc:
                raise StrataError(f"state store {self.path} is not usable: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one atomic transaction (nests)."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if not outer:
                return
            self._db.execute("COMMIT")
            seq = self._sync.note(self._db)
        self._sync.wait(seq)

    def _run(self, sql: str, args: tuple[Any, ...] = (), *, durable: bool = True) -> list[tuple[Any, ...]]:
        """Run one statement; outside a transaction, return once what it wrote or read is durable
        (``durable=False``: once it is committed — it survives ``kill -9`` at once, and a power
        cut once any later durable call has returned: the syncs cover every earlier commit)."""
        with self._lock:
            try:
                rows = self._db.execute(sql, args).fetchall()
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"record conflicts with an existing one: {exc}") from exc
            except sqlite3.Error as exc:
                raise StrataError(f"state store error: {exc}") from exc
            if self._depth:
                return rows
            seq = self._sync.note(self._db, found=bool(rows))
        if durable:
            self._sync.wait(seq)
        return rows

    # ------------------------------------------------------------------ volumes

    @staticmethod
    def _volume(row: tuple[Any, ...]) -> VolumeRecord:
        return VolumeRecord(row[0], row[1], row[2], _json_object(row[3]), row[4], row[5], row[6], row[7],
                            _STATES[row[8]], bool(row[9]), bool(row[10]), _json_object(row[11]))

    _VOLUME_COLUMNS = ("layer, name, capacity, parameters, source_kind, source_id, base_layer, "
                       "created, state, ephemeral, block, mutable")

    def add_volume_syncing(self, v: VolumeRecord) -> Callable[[], None]:
        """Write ``v`` and start making it durable in the background; the returned function
        waits until it is. For a caller that makes the volume's layer meanwhile (its own sync
        runs at the same time); a crash in between leaves a ready record whose layer does not
        exist, which start-up recovery removes (it was never acknowledged)."""
        with self._lock:
            self._insert_volume(v)
            seq = self._sync.note(self._db)
        self._sync.sync_soon(seq)
        return lambda: self._sync.wait(seq)

    def _insert_volume(self, v: VolumeRecord) -> None:
        try:
            self._db.execute(f"INSERT INTO volumes({self._VOLUME_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                             self._volume_row(v))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"record conflicts with an existing one: {exc}") from exc
        except sqlite3.Error as exc:
            raise StrataError(f"state store error: {exc}") from exc

    @staticmethod
    def _volume_row(v: VolumeRecord) -> tuple[Any, ...]:
        return (v.layer, v.name, v.capacity, json.dumps(dict(v.parameters), sort_keys=True), v.source_kind,
                v.source_id, v.base_layer, v.created, v.state.value, int(v.ephemeral),
                int(v.block), json.dumps(dict(v.mutable), sort_keys=True))

    def add_volume(self, v: VolumeRecord) -> VolumeRecord:
        self._run(f"INSERT INTO volumes({self._VOLUME_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                  self._volume_row(v))
        return v

    def volume(self, layer: str) -> VolumeRecord | None:
        rows = self._run(f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE layer=?", (layer,))
        return self._volume(rows[0]) if rows else None

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        rows = self._run(f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE name=?", (name,))
        return self._volume(rows[0]) if rows else None

    def volumes(self, *, state: RecordState | None = None) -> list[VolumeRecord]:
        """All volume records (ordered by creation time then layer: stable for paging)."""
        rows = self._run(f"SELECT {self._VOLUME_COLUMNS} FROM volumes ORDER BY created, layer")
        return [v for v in map(self._volume, rows) if state is None or v.state is state]

    def listed_volumes(self, after: str = "", limit: int = 0) -> list[VolumeRecord]:
        """Ready, non-inline volumes with a layer ID after ``after``, in layer order, at most
        ``limit`` (0: all): a page read through the primary key, whatever the page's position."""
        sql = (f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE state=? AND ephemeral=0 AND layer>? "
               "ORDER BY layer" + (" LIMIT ?" if limit else ""))
        args: tuple[Any, ...] = (RecordState.READY.value, after) + ((limit,) if limit else ())
        return [self._volume(r) for r in self._run(sql, args)]

    def set_volume(self, layer: str, **changes: Any) -> None:
        allowed = {"capacity", "state", "base_layer", "mutable"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"cannot change volume fields {sorted(set(changes) - allowed)}")
        values = [c.value if isinstance(c, Enum) else json.dumps(dict(c), sort_keys=True) if k == "mutable" else c
                  for k, c in changes.items()]
        self._run(f"UPDATE volumes SET {', '.join(f'{k}=?' for k in changes)} WHERE layer=?", (*values, layer))

    def delete_volume(self, layer: str) -> None:
        self._run("DELETE FROM volumes WHERE layer=?", (layer,))

    # ------------------------------------------------------------------ snapshots

    _SNAPSHOT_COLUMNS = ("layer, name, source_layer, size, created, state, group_id, backup_target, backup_state, "
                         "backup_ref")

    @staticmethod
    def _snapshot(row: tuple[Any, ...]) -> SnapshotRecord:
        return SnapshotRecord(row[0], row[1], row[2], row[3], row[4], _STATES[row[5]], row[6], row[7], row[8],
                              row[9])

    def add_snapshot(self, s: SnapshotRecord) -> SnapshotRecord:
        self._run(f"INSERT INTO snapshots({self._SNAPSHOT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                  (s.layer, s.name, s.source_layer, s.size, s.created, s.state.value, s.group_id, s.backup_target,
                   s.backup_state, s.backup_ref))
        return s

    def set_snapshot_backup(self, layer: str, *, backup_state: str, backup_ref: str | None = None) -> None:
        """Record where a snapshot's backup upload is (and its reference once done)."""
        if backup_ref is None:
            self._run("UPDATE snapshots SET backup_state=? WHERE layer=?", (backup_state, layer))
        else:
            self._run("UPDATE snapshots SET backup_state=?, backup_ref=? WHERE layer=?",
                      (backup_state, backup_ref, layer))

    def snapshot(self, layer: str) -> SnapshotRecord | None:
        rows = self._run(f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE layer=?", (layer,))
        return self._snapshot(rows[0]) if rows else None

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        rows = self._run(f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots WHERE name=?", (name,))
        return self._snapshot(rows[0]) if rows else None

    def snapshots(self, *, state: RecordState | None = None) -> list[SnapshotRecord]:
        rows = self._run(f"SELECT {self._SNAPSHOT_COLUMNS} FROM snapshots ORDER BY created, layer")
        return [s for s in map(self._snapshot, rows) if state is None or s.state is state]

    def set_snapshot(self, layer: str, *, state: RecordState, size: int | None = None) -> None:
        if size is None:
            self._run("UPDATE snapshots SET state=? WHERE layer=?", (state.value, layer))
        else:
            self._run("UPDATE snapshots SET state=?, size=? WHERE layer=?", (state.value, size, layer))

    def delete_snapshot(self, layer: str) -> None:
        self._run("DELETE FROM snapshots WHERE layer=?", (layer,))

    # ------------------------------------------------------------------ transfers

    _TRANSFER_COLUMNS = "name, source_id, owner, started, state"

    def add_transfer(self, t: TransferRecord) -> TransferRecord:
        self._run(f"INSERT OR REPLACE INTO transfers({self._TRANSFER_COLUMNS}) VALUES (?,?,?,?,?)",
                  (t.name, t.source_id, t.owner, t.started, t.state.value))
        return t

    def transfers(self) -> list[TransferRecord]:
        rows = self._run(f"SELECT {self._TRANSFER_COLUMNS} FROM transfers ORDER BY started, name")
        return [TransferRecord(r[0], r[1], r[2], r[3], RecordState(r[4])) for r in rows]

    def delete_transfer(self, name: str) -> None:
        self._run("DELETE FROM transfers WHERE name=?", (name,))

    # ------------------------------------------------------------------ group snapshots

    _GROUP_COLUMNS = "group_id, name, created, state, members, sources"

    @staticmethod
    def _group(row: tuple[Any, ...]) -> GroupRecord:
        return GroupRecord(row[0], row[1], tuple(json.loads(row[4])), tuple(json.loads(row[5])), row[2],
                           RecordState(row[3]))

    def add_group(self, g: GroupRecord) -> GroupRecord:
        self._run(f"INSERT INTO groups({self._GROUP_COLUMNS}) VALUES (?,?,?,?,?,?)",
                  (g.group_id, g.name, g.created, g.state.value, json.dumps(list(g.members)),
                   json.dumps(list(g.sources))))
        return g

    def group(self, group_id: str) -> GroupRecord | None:
        rows = self._run(f"SELECT {self._GROUP_COLUMNS} FROM groups WHERE group_id=?", (group_id,))
        return self._group(rows[0]) if rows else None

    def group_by_name(self, name: str) -> GroupRecord | None:
        rows = self._run(f"SELECT {self._GROUP_COLUMNS} FROM groups WHERE name=?", (name,))
        return self._group(rows[0]) if rows else None

    def groups(self) -> list[GroupRecord]:
        return [self._group(r) for r in self._run(f"SELECT {self._GROUP_COLUMNS} FROM groups ORDER BY created")]

    def set_group(self, group_id: str, state: RecordState) -> None:
        self._run("UPDATE groups SET state=? WHERE group_id=?", (state.value, group_id))

    def delete_group(self, group_id: str) -> None:
        self._run("DELETE FROM groups WHERE group_id=?", (group_id,))

    # ------------------------------------------------------------------ publications

    _PUBLICATION_COLUMNS = "layer, kind, path, readonly, flags, mount_group, source, state, mode"

    @staticmethod
    def _publication(row: tuple[Any, ...]) -> Publication:
        return Publication(row[0], row[1], row[2], bool(row[3]), tuple(json.loads(row[4])), row[5], row[6],
                           RecordState(row[7]), int(row[8]))

    # A publication's intent (``pending`` before the mount, ``removing`` before the unmount) is
    # written with durable=False by the Node service: it must survive kill -9 (COMMIT gives that),
    # not a power cut, which takes the mounts with it; the call's last write (``ready``, or the
    # delete) is durable and makes the intent durable too before the call is acknowledged.

    def add_publication(self, p: Publication, *, durable: bool = True) -> Publication:
        self._run(f"INSERT INTO publications({self._PUBLICATION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                  (p.layer, p.kind, p.path, int(p.readonly), json.dumps(list(p.flags)), p.mount_group, p.source,
                   p.state.value, p.mode), durable=durable)
        return p

    def publications(self, layer: str | None = None, kind: str | None = None) -> list[Publication]:
        rows = self._run(f"SELECT {self._PUBLICATION_COLUMNS} FROM publications ORDER BY layer, kind, path")
        return [p for p in map(self._publication, rows)
                if (layer is None or p.layer == layer) and (kind is None or p.kind == kind)]

    def publication_at(self, kind: str, path: str) -> Publication | None:
        rows = self._run(f"SELECT {self._PUBLICATION_COLUMNS} FROM publications WHERE kind=? AND path=?", (kind, path))
        return self._publication(rows[0]) if rows else None

    def set_publication(self, p: Publication, state: RecordState, *, durable: bool = True) -> None:
        self._run("UPDATE publications SET state=? WHERE layer=? AND kind=? AND path=?",
                  (state.value, p.layer, p.kind, p.path), durable=durable)

    def delete_publication(self, p: Publication) -> None:
        self._run("DELETE FROM publications WHERE layer=? AND kind=? AND path=?", (p.layer, p.kind, p.path))
