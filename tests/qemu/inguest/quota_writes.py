"""Helpers of the in-guest quota checks (imported by check_*.py; nothing to collect here):
write until a limit stops the writes, and wait for XFS to stop charging a project."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from csi.graphdriver.quota import xfs as xq

MIB = 1 << 20


def fill(path: Path, total: int, chunk: int = MIB) -> int:
    """Write up to ``total`` bytes to ``path`` (fsync'd chunk by chunk); return how many
    went in before ENOSPC/EDQUOT (any other error fails the check)."""
    written = 0
    block = b"x" * chunk
    try:
        with open(path, "wb") as f:
            while written < total:
                written += f.write(block)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        assert exc.errno in (errno.ENOSPC, errno.EDQUOT), exc
    return written


def near(written: int, limit: int) -> bool:
    """Stopped by a limit: at most ``limit``, and not far below it (directories and XFS's
    preallocation near a quota limit take a little)."""
    return limit - limit // 4 <= written <= limit


def wait_uncharged(home: Path, project_id: int, timeout_s: float = 60) -> None:
    """Deleted inodes are reclaimed by XFS in the background (inodegc): wait until nothing
    is charged to ``project_id`` any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        os.sync()
        usage = xq.read_usage(home, project_id)
        if usage.inodes == 0 and usage.used_bytes == 0:
            return
        assert time.monotonic() < deadline, f"project {project_id} still charged: {usage}"
        time.sleep(0.2)
