"""Small files replaced whole: never seen half-written, and durable when asked.

:func:`write_atomic` writes ``data`` to a temporary name in the same directory (``<prefix>`` +
random hex, so concurrent writers never share one), fsyncs it, renames it over ``path`` and,
with ``sync_dir`` (the default), fsyncs the directory so the new name survives a power cut.
A reader sees the old content or the new one. A crash may leave a temporary file behind; a
caller that sweeps them matches its ``tmp_prefix``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from csi.host.fsinfo import fsync_dir

TMP_PREFIX = ".tmp-"


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, sync_dir: bool = True,
                 tmp_prefix: str = TMP_PREFIX) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8); see the module docstring."""
    path = Path(path)
    tmp = path.with_name(f"{tmp_prefix}{path.name}.{secrets.token_hex(6)}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
