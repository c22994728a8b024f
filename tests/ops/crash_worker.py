"""Child process of the gc crash test: makes and freezes layers in a loop until killed.

Usage: python crash_worker.py HOME DRIVER RUN (RUN: a number naming this run's layers; the
base layer is made by the first run). Prints ``ready`` once its base layer exists,
then one line per finished step (flushed), so the parent kills it mid-work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from csi.graphdriver.registry import driver_class


def main() -> None:
    home, name, run = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    driver = driver_class(name)(home)
    if not driver.exists("snap-base"):
        make_base(driver)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        driver.create(f"vol-r{run}c{i}", "snap-base")
        driver.freeze(f"vol-r{run}c{i}", f"snap-r{run}c{i}")
        driver.remove(f"vol-r{run}c{i}")
        print(f"step {i}", flush=True)


def make_base(driver) -> None:  # type: ignore[no-untyped-def]
    driver.create("vol-base")
    path = driver.get("vol-base")
    for i in range(300):  # enough files that a copy (vfs) takes a while
        (path / f"f{i}").write_bytes(os.urandom(4096))
    driver.put("vol-base")
    driver.freeze("vol-base", "snap-base")


if __name__ == "__main__":
    main()
