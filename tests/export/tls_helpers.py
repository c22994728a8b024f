"""Certificates the tests make: a CA and a server certificate for 127.0.0.1 / localhost
(tests/peers/peer_pki.py makes them; this names the loopback variant these tests use)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from peer_pki import Pki  # noqa: E402
from peer_pki import make_pki as _make_pki  # noqa: E402

__all__ = ["Pki", "make_pki"]


def make_pki(directory: Path, label: str = "strata-test") -> Pki:
    return _make_pki(directory, dns=("localhost",), ips=("127.0.0.1",), label=label)
