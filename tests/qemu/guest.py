"""Boot the lane's guest once and run one shell script inside it.

Protocol between host and guest (see :file:`init.sh`):

* the host makes an *exchange* directory with ``run.sh`` in it and boots
  ``qemu-system-x86_64 -accel tcg`` with three devices: the host's ``/`` read-only over
  9p (tag ``hostroot``) so the guest runs the host's own Python, ``.venv`` and repository
  unchanged; the exchange directory over 9p (tag ``xchg``, writable); and a sparse scratch
  disk (``/dev/vda``, ext4 made on the host) that becomes the guest's ``/var/tmp``;
* the guest's init chroots into the host tree and runs ``/tmp/xchg/run.sh`` with its
  output in ``output.log``, writes the exit status to ``rc`` and powers off;
* what the script leaves in the exchange directory (e.g. a JUnit XML) is the result.

The guest never writes to the host tree: 9p is read-only; /tmp and /run are tmpfs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .image import BootImage, prepare

QEMU = "qemu-system-x86_64"


class GuestError(RuntimeError):
    """The guest did not boot or did not finish; the message carries the console tail."""


@dataclass(frozen=True)
class GuestRun:
    exit_status: int
    output: str  # what run.sh printed
    console: str  # kernel + init messages from the serial console
    seconds: float
    exchange: Path  # files run.sh left behind


def qemu_unavailable() -> str | None:
    """Why qemu cannot run here at all, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (run .ci/setup: qemu-system-x86)"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 not installed (run .ci/setup: e2fsprogs)"
    return None


def _scratch_disk(path: Path, size_bytes: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    str(path)], check=True, capture_output=True)


def run_in_guest(script: str, *, exchange: Path | None = None, timeout_s: float = 900,
                 memory_mib: int = 2048, cpus: int = 2, disk_bytes: int = 16 << 30,
                 image: BootImage | None = None) -> GuestRun:
    """Boot a guest, run ``script`` (POSIX sh) inside it, return its outcome.

    ``exchange`` (created if missing) receives ``run.sh``, ``output.log``, ``rc`` and
    whatever the script writes to ``/tmp/xchg``. Raises GuestError when the guest does
    not come back with an exit status within ``timeout_s``.
    """
    image = image or prepare()
    exchange = Path(exchange or tempfile.mkdtemp(prefix="strata-guest-"))
    exchange.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "output.log"):
        (exchange / stale).unlink(missing_ok=True)
    (exchange / "run.sh").write_text(script)
    work = Path(tempfile.mkdtemp(prefix="strata-qemu-", dir=os.environ.get("STRATA_TEST_SCRATCH", "/var/tmp")))
    try:
        disk = work / "scratch.img"
        _scratch_disk(disk, disk_bytes)
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(image.vmlinux), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 quiet panic=-1 loglevel=4",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={exchange},mount_tag=xchg,security_model=none,multidevs=remap",
            "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe,discard=unmap",
        ]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
            console = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"").decode(errors="replace")[-3000:]
            raise GuestError(f"guest did not finish within {timeout_s:.0f}s; console tail:\n{tail}") from exc
        seconds = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output_path = exchange / "output.log"
    output = output_path.read_text(errors="replace") if output_path.exists() else ""
    rc_path = exchange / "rc"
    if not rc_path.exists():
        raise GuestError(f"guest gave no exit status; console tail:\n{console[-3000:]}\noutput tail:\n{output[-3000:]}")
    return GuestRun(int(rc_path.read_text().strip() or "255"), output, console, seconds, exchange)


if __name__ == "__main__":
    import sys

    result = run_in_guest(sys.argv[1] if len(sys.argv) > 1 else "uname -a; cat /proc/filesystems | grep -E 'xfs|ext4|overlay'")
    print(result.console)
    print(result.output)
    print(f"exit {result.exit_status} after {result.seconds:.1f}s")
