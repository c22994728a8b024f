"""Read-only views of a node's stores, for operator tools and the metrics collector.

* :func:`read_records` — the CSI records of ``<root>/state.db`` (volumes, snapshots,
  publications) as the store's own record types, read through a ``mode=ro`` sqlite
  connection: nothing is written (no schema, no WAL set-up, no side files), and it is safe while
  ``strata serve`` runs (WAL readers never block the writer). ``csi.state.store`` has no
  read-only API (its :class:`StateStore` opens for writing and migrates the schema), so the
  columns are read here by name, whatever their order, and a column an older database lacks
  takes the record's default.
* :func:`driver_layers` — which driver holds state under a root, and its layer records
  (``read_layers`` of the driver class: read-only too).
* :func:`plugin_serving` — whether a plugin answers on ``<root>/csi.sock`` (a connect, no call).
"""

from __future__ import annotations

import json
import socket
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi.errors import StrataError
from csi.graphdriver.driver import Layer
from csi.graphdriver.registry import PRIORITY, driver_class, holds_state, home_of
from csi.state.store import Publication, RecordState, SnapshotRecord, VolumeRecord
from csi.host.walsync import read_only_uri

__all__ = ["Records", "read_records", "driver_layers", "drivers_with_state", "plugin_serving", "socket_of"]


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


def drivers_with_state(root: str | Path) -> list[str]:
    """Names of the drivers holding state under ``root`` (priority order; reads only)."""
    found = []
    for name in PRIORITY:
        try:
            if holds_state(Path(root), name):
                found.append(name)
        except StrataError:  # a driver whose module cannot load holds nothing we can read
            continue
    return found


def driver_layers(root: str | Path, name: str) -> list[Layer]:
    """Every layer record of driver ``name`` under ``root`` (hidden, unfinished included)."""
    return driver_class(name).read_layers(home_of(Path(root), name))


def socket_of(root: str | Path, endpoint: str = "") -> Path:
    """The plugin's socket: ``endpoint`` (``unix:///PATH``) if given, else ``<root>/csi.sock``
    (``strata serve``'s default)."""
    if endpoint:
        return Path(endpoint.removeprefix("unix://").removeprefix("unix:")).absolute()
    return Path(root).absolute() / "csi.sock"


def plugin_serving(sock: str | Path, timeout: float = 2.0) -> bool:
    """Whether something accepts connections on the unix socket ``sock``."""
    path = Path(sock)
    if not path.exists():
        return False
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
