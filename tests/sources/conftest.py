"""Fixtures of the content-source tests: strata nodes as real processes, a real registry.

* ``nodes(driver)`` — a factory of :class:`Node`: ``node_main.py`` processes (``strata serve``'s
  start-up plus a TLS peer listener stand-in, see its docstring), each with its own root on the
  filesystem the driver needs (ext4 for vfs/overlay, the session's btrfs loop filesystem for
  btrfs), its own unix socket, and a TLS listener on its own loopback address (127.0.0.N) —
  network namespaces are the channel's own tests' business; addresses differ per node so a
  node that is gone is really gone. Certificates are made by the test (``tls_helpers``).
* ``registry``, ``registry_basic`` — Debian's ``docker-registry`` (reused from tests/backup)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sources_support import Node  # first: it puts tests/backup, tests/export, tests/csi on sys.path
from registry_support import registry, registry_basic  # noqa: E402,F401 - the fixtures, shared with tests/backup
from tls_helpers import Pki, make_pki  # noqa: E402

from csi.host import mount as mnt


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def nodes(request: pytest.FixtureRequest, ext4_dir: Path, pki: Pki) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []
    run = uuid.uuid4().hex[:6]

    def make(node_id: str, driver: str, env: dict[str, str] | None = None, start: bool = True) -> Node:
        base_dir = request.getfixturevalue("btrfs_dir") if driver == "btrfs" else ext4_dir
        ip = f"127.0.{int(run[:2], 16) % 200 + 10}.{len(made) + 2}"
        node = Node(Path(base_dir) / f"{run}-{node_id}", node_id, driver, ip, pki, env or {})
        for other in made:
            other.peers[node.node_id] = node.address
            node.peers[other.node_id] = other.address
        made.append(node)
        return node

    yield make
    for node in made:
        try:
            node.stop()
        except Exception:  # noqa: BLE001 - teardown goes on
            pass
    for node in made:
        for mp in mnt.mounts_under(node.base):
            mnt.unmount(mp.target, detach=True)
