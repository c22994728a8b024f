"""The state store's schema across versions: a database written while volumes recorded a
``parent_layer`` opens, reads every field right, and takes new rows; a new database has no
such column."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from csi.state.store import RecordState, StateStore, VolumeRecord

OLD = "vol-0123456789abcdef0123456789abcdef"
BASE = "base-0123456789abcdef0123456789abcdef"
NEW = "vol-fedcba9876543210fedcba9876543210"


def _columns(path: Path) -> list[str]:
    db = sqlite3.connect(path / "state.db")
    try:
        return [row[1] for row in db.execute("PRAGMA table_info(volumes)")]
    finally:
        db.close()


def test_a_database_with_the_dropped_parent_layer_column_still_works(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(f"""
        CREATE TABLE volumes(layer TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, capacity INTEGER NOT NULL,
            parameters TEXT NOT NULL, source_kind TEXT NOT NULL, source_id TEXT NOT NULL, parent_layer TEXT,
            base_layer TEXT, created REAL NOT NULL, state TEXT NOT NULL, ephemeral INTEGER NOT NULL,
            block INTEGER NOT NULL DEFAULT 0);
        INSERT INTO volumes VALUES ('{OLD}', 'clone', 7, '{{"layeredDriver": "vfs"}}', 'volume', 'src@n',
            '{BASE}', '{BASE}', 2.5, 'ready', 0, 1);
    """)
    db.close()
    store = StateStore(tmp_path)
    try:
        (old,) = store.volumes()
        assert old == VolumeRecord(layer=OLD, name="clone", capacity=7, parameters={"layeredDriver": "vfs"},
                                   source_kind="volume", source_id="src@n", base_layer=BASE, created=2.5,
                                   state=RecordState.READY, ephemeral=False, block=True)
        assert dict(old.parameters) == {"layeredDriver": "vfs"}
        store.add_volume(VolumeRecord(layer=NEW, name="fresh", capacity=3, base_layer=None, created=3.0,
                                      state=RecordState.READY))
        store.set_volume(NEW, capacity=4)
        fresh = store.volume_by_name("fresh")
        assert fresh is not None and fresh.capacity == 4 and fresh.base_layer is None and fresh.created == 3.0
    finally:
        store.close()
    assert "parent_layer" in _columns(tmp_path), "an old column is left in place, unused"


def test_a_new_database_has_no_parent_layer(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    assert "parent_layer" not in _columns(tmp_path)
    assert "parent_layer" not in VolumeRecord.__dataclass_fields__
