"""Crash-safe layer records: one sqlite3 database (WAL) per driver home.

On-disk layout: ``<home>/layers.db`` with one table::

    layers(id TEXT PRIMARY KEY, parent TEXT NULL, kind TEXT, size_bytes INTEGER NULL,
           state TEXT, hidden INTEGER, mounts INTEGER, origin TEXT NULL,
           created REAL, extra TEXT)

``state`` is ``creating`` (intent recorded, disk work may be half done),
``ready`` (committed) or ``removing`` (forgotten, disk work may be half done).
``mounts`` is the persisted get/put reference count. ``origin`` is the writable layer a
frozen layer was frozen from (for a freeze in progress, it is what recovery needs).
``extra`` is a small JSON object a driver may use for its own per-layer facts; the key
``"block": true`` is the base machinery's own and marks a raw block layer (no filesystem,
see :attr:`Layer.block`).
Every write is its own transaction (or part of :meth:`LayerStore.transaction`): once a
call returns, the record survives ``kill -9`` and a power cut, and so does everything a
read returned. Concurrent callers share the fsyncs (group commit, :mod:`csi.host.walsync`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from csi.errors import AlreadyExists, NotFound, StrataError
from csi.graphdriver.driver import Layer, LayerKind, LayerState
from csi.host.walsync import WalSync, open_wal_database, read_only_uri


_COLUMNS = ("id", "parent", "kind", "size_bytes", "state", "hidden", "mounts", "origin", "created", "extra")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    parent TEXT,
    kind TEXT NOT NULL,
    size_bytes INTEGER,
    state TEXT NOT NULL,
    hidden INTEGER NOT NULL DEFAULT 0,
    mounts INTEGER NOT NULL DEFAULT 0,
    origin TEXT,
    created REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
"""


_KINDS = {k.value: k for k in LayerKind}
_STATES = {s.value: s for s in LayerState}


def _row_to_layer(row: tuple[Any, ...]) -> Layer:
    """A record from a row in ``_COLUMNS`` order (start-up reads every row several times:
    no per-row dict, enum lookups through a table, the common empty ``extra`` not parsed)."""
    layer_id, parent, kind, size_bytes, state, hidden, mounts, origin, created, extra = row
    return Layer(layer_id, parent, _KINDS[kind], size_bytes, _STATES[state], bool(hidden), int(mounts), origin,
                 float(created), json.loads(extra) if extra and extra != "{}" else {})


class LayerStore:
    """The records of one driver home. Thread-safe; every method is one transaction."""

    FILENAME = "layers.db"

    @classmethod
    def has_records(cls, home: Path) -> bool | None:
        """Whether ``<home>/layers.db`` holds any record, read-only (None: no database;
        an unreadable one counts as holding records)."""
        db = Path(home) / cls.FILENAME
        if not db.exists():
            return None
        try:
            with closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
                return conn.execute("SELECT COUNT(*) FROM layers").fetchone()[0] > 0
        except sqlite3.Error:
            return True

    @classmethod
    def read_only(cls, home: Path) -> list[Layer]:
        """Every record of ``<home>/layers.db``, read without writing anything (no WAL set-up,
        no schema): for tools that look while the plugin may be running. [] without a database."""
        db = Path(home) / cls.FILENAME
        if not db.exists():
            return []
        try:
            with closing(sqlite3.connect(read_only_uri(db), uri=True, timeout=30)) as conn:
                rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM layers ORDER BY created, id").fetchall()
        except sqlite3.Error as exc:
            raise StrataError(f"cannot read the layer records in {db}: {exc}") from exc
        return [_row_to_layer(r) for r in rows]

    def __init__(self, home: Path) -> None:
        self.path = Path(home) / self.FILENAME
        self._lock = threading.RLock()
        self._db = open_wal_database(self.path, _SCHEMA, timeout=30)
        self._sync = WalSync(self._db, self.path)
        self._depth = 0  # open transaction() blocks

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Group several writes atomically (durable when the block exits)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self._db
            except BaseException:
                self._depth -= 1
                self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            self._db.execute("COMMIT")
            seq = self._sync.note(self._db)
        self._sync.wait(seq)

    def _execute(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[list[tuple[Any, ...]], int]:
        """Run one statement: its rows and rowcount. Outside a transaction it returns once
        what it wrote or read is durable."""
        with self._lock:
            cur = self._db.execute(sql, args)
            result = cur.fetchall(), cur.rowcount
            if self._depth:
                return result
            seq = self._sync.note(self._db, found=bool(result[0]))
        self._sync.wait(seq)
        return result

    def get(self, layer_id: str) -> Layer | None:
        rows, _ = self._execute(f"SELECT {','.join(_COLUMNS)} FROM layers WHERE id=?", (layer_id,))
        return _row_to_layer(rows[0]) if rows else None

    def require(self, layer_id: str) -> Layer:
        layer = self.get(layer_id)
        if layer is None:
            raise NotFound(f"layer {layer_id} does not exist")
        return layer

    def all(self) -> list[Layer]:
        rows, _ = self._execute(f"SELECT {','.join(_COLUMNS)} FROM layers ORDER BY created, id")
        return [_row_to_layer(r) for r in rows]

    def children(self, layer_id: str) -> list[Layer]:
        rows, _ = self._execute(f"SELECT {','.join(_COLUMNS)} FROM layers WHERE parent=? ORDER BY id", (layer_id,))
        return [_row_to_layer(r) for r in rows]

    def insert(self, layer: Layer) -> None:
        values = (
            layer.id, layer.parent, layer.kind.value, layer.size_bytes, layer.state.value,
            int(layer.hidden), layer.mounts, layer.origin, layer.created, json.dumps(layer.extra),
        )
        try:
            self._execute(f"INSERT INTO layers ({','.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})", values)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"layer {layer.id} already exists") from exc

    def update(self, layer_id: str, **fields: Any) -> Layer:
        """Set the given columns; returns the updated record."""
        sets, values = [], []
        for key, value in fields.items():
            if key not in _COLUMNS or key == "id":
                raise KeyError(key)
            if isinstance(value, Enum):
                value = value.value
            elif key == "extra":
                value = json.dumps(value)
            elif isinstance(value, bool):
                value = int(value)
            sets.append(f"{key}=?")
            values.append(value)
        _, changed = self._execute(f"UPDATE layers SET {','.join(sets)} WHERE id=?", (*values, layer_id))
        if changed != 1:
            raise NotFound(f"layer {layer_id} does not exist")
        return self.require(layer_id)

    def delete(self, layer_id: str) -> None:
        self._execute("DELETE FROM layers WHERE id=?", (layer_id,))
