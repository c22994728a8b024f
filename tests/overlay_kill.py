"""A child process that dies by SIGKILL at a named step of an overlay freeze, for crash tests
(on the host: tests/drivers/test_overlay.py; in the kernel lane: the quota checks).

``KILL_AT_STEP`` is Python source to put before a child script: its ``kill_at(step)`` wraps
the driver method that ends (or starts) that step so the process kills itself there.
Production code knows nothing of it.
"""

KILL_AT_STEP = r"""
import os, signal
from csi.graphdriver.overlay import upperdelta
from csi.graphdriver.overlay.driver import OverlayDriver
from csi.graphdriver.overlay.layout import Layout

def _die_at(owner, name, *, before=False, when=lambda *args, **kwargs: True):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        if before and when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if not before and when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapper)

def _frozen_make(self, layer_id, *, writable, **kwargs):
    return not writable

_KILL_AT = {  # step: where the child dies (the records and disk as that step leaves them)
    "freeze-rename:recorded": (Layout, "make", True, _frozen_make),  # mode recorded, nothing made
    "freeze-rename:made": (Layout, "make", False, _frozen_make),  # frozen layer's dirs made
    "freeze-rename:moved": (OverlayDriver, "_finish_rename", True, None),  # diff dir renamed
    "freeze-rename:fresh": (OverlayDriver, "_fresh_diff", False, None),  # diff.new ready, not renamed
    "freeze-rename:finished": (OverlayDriver, "_finish_rename", False, None),  # all done, not committed
    "freeze-copy:recorded": (Layout, "make", True, _frozen_make),
    "freeze-copy:copied": (upperdelta.UpperIndex, "write", False, None),  # copy and index made
    "freeze-copy:moved": (OverlayDriver, "_freeze_by_copy", False, None),  # copy renamed, not committed
}

def kill_at(step):
    owner, name, before, when = _KILL_AT[step]
    _die_at(owner, name, before=before, **({"when": when} if when else {}))
"""

