"""Run the devicemapper benchmark (:mod:`csi.bench.devicemapper`) in the qemu guest.

``python -m tests.qemu.bench [--sizes 64M,256M,1G] [--json]`` boots one guest, runs the
benchmark there and prints its table (or JSON). Not part of the test run: speed is
measured here, never asserted in a test.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .guest import run_in_guest

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    args = " ".join(shlex.quote(a) for a in argv)
    script = (f"cd {shlex.quote(str(REPO))}\n"
              f"exec {shlex.quote(sys.executable)} -c 'import sys; from csi.bench.devicemapper import main; "
              f"sys.exit(main(sys.argv[1:]))' {args}\n")
    result = run_in_guest(script, timeout_s=1800, memory_mib=3072)
    sys.stdout.write(result.output)
    print(f"(guest run {result.seconds:.0f}s under qemu TCG)", file=sys.stderr)
    return result.exit_status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
