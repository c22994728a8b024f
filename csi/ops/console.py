"""What the operator commands share: common flags, logging, progress, output.

* :func:`add_common_flags` — ``--root`` and ``--endpoint`` (defaults: ``strata serve``'s), ``--log-format
  text|json`` (json: one object per line, for pods and log collectors), ``--log-level``.
* :func:`setup_logging` — the root logger to stderr in the chosen format.
* :class:`Progress` — a one-line counter redrawn in place on a terminal (stderr is a tty);
  elsewhere (pods, pipes) one log line at the start and one at the end, nothing per step.
* :func:`emit_json` — a command's ``--json`` answer on stdout.
"""

from __future__ import annotations

from csi.graphdriver.registry import DRIVER_CLASSES
from csi.services.listen import key_values

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any

__all__ = ["DEFAULT_ROOT", "JsonFormatter", "Progress", "add_common_flags", "add_driver_flag", "add_storage_opt_flag",
           "emit_json", "setup_logging", "storage_opts"]

DEFAULT_ROOT = Path("strata-data")  # `strata serve --root`'s default (csi.services.server.DEFAULT_ROOT)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=str(DEFAULT_ROOT), type=Path,
                        help=f"the plugin's root directory (default: ./{DEFAULT_ROOT}, as strata serve)")
    parser.add_argument("--endpoint", default="", help="the plugin's socket, unix:///PATH (default: <root>/csi.sock)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text (terminals) or one JSON object per line (pods)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")


def add_driver_flag(parser: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """``--driver``: which layered driver the command works on."""
    choices = sorted(DRIVER_CLASSES) if default is None else [default, *sorted(DRIVER_CLASSES)]
    parser.add_argument("--driver", default=default, choices=choices, help=what)


def add_storage_opt_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="driver option, as strata serve's (repeatable; devicemapper needs its pool's)")


def storage_opts(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    """``--storage-opt KEY=VALUE`` values as a dict; a malformed one is a usage error."""
    return dict(key_values(parser, "--storage-opt", values))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, sort_keys=True)


def setup_logging(fmt: str = "text", level: str = "warning", stream: IO[str] | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class Progress:
    """``with Progress("reading layers", total) as p: p.step()`` — see the module docstring."""

    def __init__(self, what: str, total: int | None = None, stream: IO[str] | None = None,
                 log: logging.Logger | None = None) -> None:
        self.what, self.total, self.done = what, total, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log = log or logging.getLogger("strata.ops")
        self._shown = 0.0
        self._start = time.monotonic()

    def __enter__(self) -> Progress:
        if not self.tty:
            self.log.info("%s…", self.what)
        return self

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and (now - self._shown > 0.1 or self.done == self.total):
            self._shown = now
            of = f"/{self.total}" if self.total is not None else ""
            self.stream.write(f"\r{self.what}: {self.done}{of}")
            self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        seconds = time.monotonic() - self._start
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.log.info("%s: %d done in %.2f s", self.what, self.done, seconds)


def emit_json(value: Any, stream: IO[str] | None = None) -> None:
    out = stream or sys.stdout
    json.dump(value, out, indent=2, sort_keys=True, default=str)
    out.write("\n")
