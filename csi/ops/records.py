"""Read-only views of a node's stores, for operator tools and the metrics collector.

* the CSI records: :func:`csi.state.readonly.read_records`;
* :func:`driver_layers` — which driver holds state under a root, and its layer records
  (``read_layers`` of the driver class: read-only too).
* :func:`plugin_serving` — whether a plugin answers on ``<root>/csi.sock`` (a connect, no call).
"""

from __future__ import annotations

import socket
from contextlib import closing
from pathlib import Path

from csi.errors import StrataError
from csi.graphdriver.driver import Layer
from csi.graphdriver.registry import PRIORITY, driver_class, holds_state, home_of

__all__ = ["driver_layers", "drivers_with_state", "plugin_serving", "socket_of"]


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
