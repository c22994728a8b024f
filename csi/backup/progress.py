"""Progress of a backup or restore: one value type, one callback, two renderers.

Contract: an operation calls ``callback(Progress)`` when a blob starts, every
:data:`REPORT_EVERY` bytes (or at most every :data:`REPORT_INTERVAL` seconds) while it moves,
when it is skipped (the target already had it: ``skipped=True``) and when it is done. ``done``
and ``total`` count the bytes of the whole operation (``total`` is the sum of the known blob
sizes and may grow while unknown sizes become known: a fresh diff's size is only known once it
was streamed, so ``total`` is then an estimate from ``diff_size`` or None). A callback must be
quick and must not raise; an exception from it is logged and ignored.

Renderers: :class:`TerminalBar` (a one-line bar with bytes and rate, for a terminal) and
:class:`JsonLines` (one JSON object per report, for a pod's log). Neither ever prints a
credential: reports carry digests, sizes and layer IDs only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import IO

from csi.host.pipestream import ReadStream

log = logging.getLogger(__name__)

REPORT_EVERY = 8 << 20
REPORT_INTERVAL = 0.5


@dataclass(frozen=True)
class Progress:
    """A snapshot of an operation's progress."""

    operation: str  # "backup" | "restore"
    phase: str  # "start" | "blob" | "skip" | "blob-done" | "done"
    done: int  # bytes moved so far (all blobs)
    total: int | None  # bytes expected in all (None: unknown)
    rate: float  # bytes per second since the operation started
    blob: str = ""  # digest (or layer id while its digest is unknown)
    blob_done: int = 0
    blob_total: int | None = None
    skipped: bool = False
    elapsed: float = 0.0


ProgressCallback = Callable[[Progress], None]


def _nothing(_: Progress) -> None:
    return None


class Meter:
    """Accumulates bytes and calls the callback at a bounded rate. Not thread-safe: one per operation."""

    def __init__(self, operation: str, callback: ProgressCallback | None, total: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._callback = callback or _nothing
        self._clock = clock
        self._start = clock()
        self._last_report = self._start
        self._last_bytes = 0
        self._state = Progress(operation, "start", 0, total, 0.0)
        self._emit(self._state)

    @property
    def done(self) -> int:
        return self._state.done

    def _emit(self, p: Progress) -> None:
        try:
            self._callback(p)
        except Exception:  # a broken renderer must not break a backup
            log.exception("progress callback failed")

    def _update(self, **changes: object) -> Progress:
        now = self._clock()
        elapsed = now - self._start
        done = changes.get("done", self._state.done)
        rate = done / elapsed if elapsed > 0 else 0.0  # type: ignore[operator]
        self._state = replace(self._state, rate=rate, elapsed=elapsed, **changes)  # type: ignore[arg-type]
        return self._state

    def add_total(self, size: int | None) -> None:
        if size is None:
            self._state = replace(self._state, total=None)
        elif self._state.total is not None:
            self._state = replace(self._state, total=self._state.total + size)

    def begin(self, blob: str, size: int | None) -> None:
        self._emit(self._update(phase="blob", blob=blob, blob_done=0, blob_total=size, skipped=False))

    def advance(self, n: int) -> None:
        st = self._state
        self._state = replace(st, done=st.done + n, blob_done=st.blob_done + n)
        now = self._clock()
        if self._state.done - self._last_bytes >= REPORT_EVERY or now - self._last_report >= REPORT_INTERVAL:
            self._last_report, self._last_bytes = now, self._state.done
            self._emit(self._update(phase="blob"))

    def skip(self, blob: str, size: int) -> None:
        self._emit(self._update(phase="skip", blob=blob, blob_done=0, blob_total=size, skipped=True))

    def end_blob(self, blob: str) -> None:
        self._emit(self._update(phase="blob-done", blob=blob))

    def finish(self) -> Progress:
        final = self._update(phase="done", total=self._state.done if self._state.total is None else self._state.total)
        self._emit(final)
        return final


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class TerminalBar:
    """Renders reports as one rewritten line: ``[#####.....] 120.0 MiB / 1.0 GiB  85.3 MiB/s``."""

    def __init__(self, out: IO[str] | None = None, width: int = 30) -> None:
        self.out = out or sys.stderr
        self.width = width

    def __call__(self, p: Progress) -> None:
        if p.total:
            filled = min(self.width, int(self.width * p.done / p.total))
            bar = "[" + "#" * filled + "." * (self.width - filled) + "]"
            amount = f"{_human(p.done)} / {_human(p.total)}"
        else:
            bar, amount = "[" + "?" * self.width + "]", _human(p.done)
        what = "skipped (already there) " + p.blob[:19] if p.skipped else p.blob[:19]
        end = "\n" if p.phase == "done" else ""
        self.out.write(f"\r{p.operation} {bar} {amount}  {_human(p.rate)}/s  {what}\x1b[K{end}")
        self.out.flush()


class JsonLines:
    """Renders reports as one JSON object per line (structured logs in a pod)."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, p: Progress) -> None:
        record = {k: v for k, v in asdict(p).items()}
        record["rate"] = round(p.rate, 1)
        record["elapsed"] = round(p.elapsed, 3)
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()


def renderer_for(out: IO[str]) -> ProgressCallback:
    """A bar on a terminal, JSON lines otherwise."""
    return TerminalBar(out) if out.isatty() else JsonLines(out)


class MeteredReader(ReadStream):
    """Advances ``meter`` by the bytes read through it (a blob on its way in or out)."""

    def __init__(self, raw: IO[bytes], meter: Meter) -> None:
        self._raw, self._meter = raw, meter

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._meter.advance(len(data))
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        readinto = getattr(self._raw, "readinto", None)
        if readinto is None:
            return super().readinto(buf)  # counted by read
        n = readinto(buf)
        if n:
            self._meter.advance(n)
        return n

    def close(self) -> None:
        self._raw.close()
