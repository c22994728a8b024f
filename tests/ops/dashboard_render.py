"""A small renderer of the Grafana dashboard's panels: every panel's PromQL targets,
evaluated over a time range by a real Prometheus, drawn with matplotlib in the dashboard's
grid into one PNG. It is a picture of the panels' data (titles, series, units), not of
Grafana itself."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RATE_INTERVAL = "30s"
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def concrete(expr: str) -> str:
    """A panel expression with the dashboard variables filled as Grafana would for 'All'."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace('=~"$node"', '=~".+"')


def targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _fmt(unit: str) -> Callable[[float, Any], str]:
    def bytes_(v: float, _: Any) -> str:
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or u == "TiB":
                return f"{v:.2f} {u}"
            v /= 1024
        return str(v)

    return {"bytes": bytes_, "percentunit": lambda v, _: f"{v * 100:.2f}%", "s": lambda v, _: f"{v * 1000:.0f} ms",
            "reqps": lambda v, _: f"{v:.2f}/s"}.get(unit, lambda v, _: f"{v:g}")


def render(dashboard: dict[str, Any], series_of: Callable[[str], list[dict[str, Any]]], out: Path) -> int:
    """Draw every panel; ``series_of(expr)`` gives Prometheus range results. Returns the
    number of series drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(15, rows * 0.5), dpi=72)
    grid = fig.add_gridspec(rows, 24, hspace=4, wspace=5)
    fig.suptitle(dashboard["title"] + " — " + dashboard.get("description", "").split(":")[0], fontsize=11)
    drawn = 0
    for panel in panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_title(panel["title"], fontsize=10, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        ax.yaxis.set_major_formatter(FuncFormatter(_fmt(unit)))
        start = None
        for target in panel["targets"]:
            for s in series_of(concrete(target["expr"])):
                points = [(float(t), float(v)) for t, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if not points:
                    continue
                start = min(start or points[0][0], points[0][0])
                label = _LEGEND.sub(lambda m: s["metric"].get(m[1], ""), target.get("legendFormat", ""))
                ax.plot([t for t, _ in points], [v for _, v in points], label=label, linewidth=1.2)
                drawn += 1
        if start is not None:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, s0=start: f"{v - s0:.0f}s"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.savefig(out, format="png", dpi=72)
    plt.close(fig)
    return drawn
