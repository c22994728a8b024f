"""Per-key, non-blocking locks: a call racing another on the same name or ID is ABORTED.

``with locks.hold("name:pvc-1", "vol:vol-...")`` takes every key or none; if another
call holds one of them, :class:`csi.errors.Aborted` is raised at once (CSI asks the
caller to retry rather than queue). Keys are released when the block ends. Calls on
different keys never wait for each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi.errors import Aborted


class KeyLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = {k for k in keys if k}
        with self._guard:
            busy = sorted(wanted & self._held)
            if busy:
                raise Aborted(f"an operation on {', '.join(busy)} is already in progress; retry")
            self._held |= wanted
        try:
            yield
        finally:
            with self._guard:
                self._held -= wanted
