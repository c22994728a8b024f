"""Figures, goals and the plain-text tables ``strata bench`` prints.

Values are kept raw (seconds, bytes/s, counts) in frozen dataclasses; formatting happens
only when a :class:`Table` is rendered. A :class:`Goal` holds the measured figure, the
limit and the comparison, so PASS / MISS is computed from the numbers of the same run,
never written by hand. ``n/a`` means the figure was not measured (driver unavailable,
size not in ``--sizes``), with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def timed(action: Callable[[], T]) -> tuple[float, T]:
    """Run ``action`` and return (wall seconds, its result), measured with perf_counter."""
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Latency:
    """p50 / p99 / max of a list of durations (seconds) and how many there were."""

    rounds: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Latency:
        return cls(len(samples), percentile(samples, 50), percentile(samples, 99), max(samples))


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = seconds * 1000
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def ratio(baseline: float | None, measured: float | None) -> str:
    """How many times faster than the baseline (``x12``), or slower (``/3.1``)."""
    if baseline is None or measured is None or measured <= 0 or baseline <= 0:
        return "-"
    r = baseline / measured
    if r >= 1:
        return f"x{r:.0f}" if r >= 10 else f"x{r:.1f}"
    return f"/{1 / r:.1f}"


def with_ratio(measured: float | None, baseline: float | None) -> str:
    if measured is None:
        return "-"
    return f"{ms(measured)} ({ratio(baseline, measured)})"


def mbps(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else f"{bytes_per_second / 1e6:.0f} MB/s"


@dataclass(frozen=True)
class Goal:
    """One goal from the issues, checked against a figure of this run."""

    subject: str  # "btrfs on btrfs: freeze, 1 GiB, mounted"
    target: str  # "<= 50 ms"
    figure: str  # the measured figure, formatted ("12.3 ms"), or "n/a"
    passed: bool | None  # None: not measured
    note: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def at_most(subject: str, seconds: float | None, limit_s: float, note: str = "") -> Goal:
    passed = None if seconds is None else seconds <= limit_s
    return Goal(subject, f"<= {ms(limit_s)}", ms(seconds) if seconds is not None else "n/a", passed, note)


def at_least(subject: str, value: float | None, limit: float, shown: Callable[[float], str],
             note: str = "") -> Goal:
    passed = None if value is None else value >= limit
    return Goal(subject, f">= {shown(limit)}", shown(value) if value is not None else "n/a", passed, note)


@dataclass(frozen=True)
class Table:
    """A titled table of already formatted cells, plus notes printed under it."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
        def line(cells: Iterable[str]) -> str:
            parts = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
            return "  ".join(parts).rstrip()
        out = [self.title, "=" * len(self.title), line(self.columns), line("-" * w for w in widths)]
        out += [line(row) for row in self.rows]
        if not self.rows:
            out.append("(nothing measured)")
        out += [f"  * {note}" for note in self.notes]
        return "\n".join(out)


def goals_table(title: str, goals: Sequence[Goal]) -> Table:
    rows = tuple((g.subject, g.target, g.figure, g.verdict) for g in goals)
    notes = tuple(dict.fromkeys(g.note for g in goals if g.note))
    return Table(title, ("goal", "target", "measured", "verdict"), rows, notes)


@dataclass(frozen=True)
class Section:
    """What one part of the benchmark produced: tables, goals, raw figures for JSON."""

    name: str
    tables: tuple[Table, ...]
    goals: tuple[Goal, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    skipped: tuple[tuple[str, str], ...] = ()  # (case, reason)

    def render(self) -> str:
        parts = [t.render() for t in self.tables]
        if self.skipped:
            parts.append("Skipped:\n" + "\n".join(f"  {case}: {why}" for case, why in self.skipped))
        if self.goals:
            parts.append(goals_table(f"{self.name}: goals", self.goals).render())
        return "\n\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "figures": self.raw,
            "skipped": [{"case": c, "reason": r} for c, r in self.skipped],
            "goals": [
                {"subject": g.subject, "target": g.target, "measured": g.figure, "verdict": g.verdict, "note": g.note}
                for g in self.goals
            ],
            "tables": [{"title": t.title, "columns": list(t.columns), "rows": [list(r) for r in t.rows],
                        "notes": list(t.notes)} for t in self.tables],
        }
