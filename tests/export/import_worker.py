"""Serve the Diff export service in its own process, for the kill -9 tests of ImportDiff.

Usage: python import_worker.py DRIVER ROOT SOCKET POINT

Prints ``READY`` once serving. POINT ``freeze`` stops (prints ``AT freeze`` and sleeps until
killed) after a verified layer was frozen, before the temporary layer is removed; ``none``
serves normally. A stop *inside* apply_diff needs no hook: the client stops sending.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from csi.backup.index import is_temporary
from csi.graphdriver.registry import new_driver
from csi.services.export import ExportBackend, start_unix_export


def main() -> None:
    name, root, sock, point = sys.argv[1:5]
    driver = new_driver(root, name).driver
    if point == "freeze":
        real_remove = driver.remove

        def remove(layer_id: str) -> None:
            if is_temporary(layer_id):
                print("AT freeze", flush=True)
                while True:
                    time.sleep(1)
            real_remove(layer_id)

        driver.remove = remove  # type: ignore[method-assign]
    start_unix_export(ExportBackend(driver, "node-b"), Path(sock))
    print("READY", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
