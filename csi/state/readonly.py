"""The CSI records read without writing anything, for operator tools and the metrics collector.

:func:`read_records` returns the records of ``<root>/state.db`` (volumes, snapshots,
publications) as the store's own record types, read through a read-only sqlite connection
(:func:`csi.host.walsync.read_only_uri`): no schema, no WAL set-up, no side files, and safe
while ``strata serve`` runs (WAL readers never block the writer). The columns are read by
name, whatever their order, and a column an older database lacks takes the record's default.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi.errors import StrataError
from csi.host.walsync import read_only_uri
from csi.state.store import Publication, RecordState, SnapshotRecord, VolumeRecord


@dataclass(frozen=True)
class Records:
    volumes: tuple[VolumeRecord, ...] = ()
    snapshots: tuple[SnapshotRecord, ...] = ()
    publications: tuple[Publication, ...] = ()


def _rows(conn: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    names = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    if not names:
        return []
    cur = conn.execute(f"SELECT {', '.join(names)} FROM {table}")
    return [dict(zip(names, row)) for row in cur.fetchall()]


def read_records(root: str | Path) -> Records:
    """The CSI records under ``root``, read-only; empty when there is no ``state.db``."""
    db = Path(root) / "state.db"
    if not db.exists():
        return Records()
    try:
        with closing(sqlite3.connect(read_only_uri(db), uri=True, timeout=30)) as conn:
            vols, snaps, pubs = (_rows(conn, t) for t in ("volumes", "snapshots", "publications"))
    except sqlite3.Error as exc:
        raise StrataError(f"cannot read the CSI records in {db}: {exc}") from exc
    volumes = tuple(VolumeRecord(
        layer=r["layer"], name=r["name"], capacity=int(r.get("capacity") or 0),
        parameters=json.loads(r.get("parameters") or "{}"), source_kind=r.get("source_kind") or "",
        source_id=r.get("source_id") or "", base_layer=r.get("base_layer"), created=float(r.get("created") or 0),
        state=RecordState(r.get("state") or "ready"), ephemeral=bool(r.get("ephemeral")), block=bool(r.get("block")),
    ) for r in vols)
    snapshots = tuple(SnapshotRecord(
        layer=r["layer"], name=r["name"], source_layer=r.get("source_layer") or "", size=int(r.get("size") or 0),
        created=float(r.get("created") or 0), state=RecordState(r.get("state") or "ready"),
    ) for r in snaps)
    publications = tuple(Publication(
        layer=r["layer"], kind=r["kind"], path=r["path"], readonly=bool(r.get("readonly")),
        flags=tuple(json.loads(r.get("flags") or "[]")),
        mount_group=r.get("mount_group") or "", source=r.get("source") or "",
        state=RecordState(r.get("state") or "ready"),
    ) for r in pubs)
    return Records(volumes, snapshots, publications)
