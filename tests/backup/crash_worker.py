"""Run a restore in its own process and stop at a named point, for the kill -9 tests.

Usage: python crash_worker.py DRIVER ROOT LAYOUT DIGEST POINT

POINT is ``apply`` (inside apply_diff, after the first 64 KiB of a layer was read) or
``freeze`` (after the verified layer was frozen, before the temporary one is removed). At the
point the worker prints ``AT <point>`` and sleeps until it is killed.
"""

from __future__ import annotations

import sys
import time

from csi.backup import restore
from csi.backup.index import is_temporary
from csi.backup.layout import LayoutTarget
from csi.graphdriver.registry import new_driver


def main() -> None:
    name, root, layout, digest, point = sys.argv[1:6]
    driver = new_driver(root, name).driver

    def stop() -> None:
        print(f"AT {point}", flush=True)
        while True:
            time.sleep(1)

    class SlowTarget(LayoutTarget):
        def open_blob(self, digest, size=None):
            reader = super().open_blob(digest, size)
            if point != "apply" or size is None or size < 100_000:
                return reader
            real_read, real_readinto, count = reader.read, reader.readinto, [0]

            def took(n: int) -> None:
                count[0] += n
                if count[0] > 65536:
                    stop()

            def read(n=-1):
                data = real_read(n)
                took(len(data))
                return data

            def readinto(buf):
                n = real_readinto(buf)
                took(n)
                return n

            reader.read = read  # type: ignore[method-assign]
            reader.readinto = readinto  # type: ignore[method-assign]
            return reader

    if point == "freeze":
        real_remove = driver.remove

        def remove(layer_id: str) -> None:
            if is_temporary(layer_id):
                stop()
            real_remove(layer_id)

        driver.remove = remove  # type: ignore[method-assign]
    restore(driver, SlowTarget(layout), digest)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
