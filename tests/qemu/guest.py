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
Host directories the lane needs that those guest mounts would hide (a checkout or a
virtual environment under ``/tmp`` or ``/var/tmp``) are bind-mounted back on top of them
(:func:`hidden_host_paths`, passed as ``strata.keep=`` on the kernel command line).

:func:`qemu_command` builds the command line and :func:`start_guest` starts it without
waiting, for callers that stop the guest themselves (the power-cut lane kills it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .image import BootImage, prepare

QEMU = "qemu-system-x86_64"
REPO = Path(__file__).resolve().parents[2]
#: host directories the guest mounts its own filesystems on (init.sh)
GUEST_MOUNTED = (Path("/tmp"), Path("/var/tmp"), Path("/run"))
GUEST_HIDDEN = (Path("/dev"), Path("/proc"), Path("/sys"))


class GuestError(RuntimeError):
    """The guest did not boot or did not finish; the message carries the console tail."""


class HostPathError(GuestError):
    """A directory the guest needs cannot be shown to it (see :func:`hidden_host_paths`)."""


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


def hidden_host_paths(paths: list[Path] | None = None) -> list[str]:
    """Host directories the guest needs (the repository, the interpreter's environment)
    that lie under a directory the guest mounts its own filesystem on (``/tmp``,
    ``/var/tmp``, ``/run``): init.sh binds them back on top. Raises GuestError when one
    cannot be passed (under /dev, /proc or /sys, or a path with whitespace or commas)."""
    candidates = paths if paths is not None else [
        REPO, Path(sys.prefix), Path(sys.executable).parent.parent,
        Path(sys.prefix).resolve(), Path(sys.executable).resolve().parent.parent]
    wanted: list[Path] = []
    for path in candidates:
        path = Path(os.path.abspath(path))
        if any(path == h or h in path.parents for h in GUEST_HIDDEN):
            raise HostPathError(f"{path} lies under a directory the guest replaces; move the checkout elsewhere")
        if any(m in path.parents for m in GUEST_MOUNTED) and path not in wanted:
            wanted.append(path)
    kept = sorted(p for p in wanted if not any(q in p.parents for q in wanted))
    for path in kept:
        if any(c.isspace() or c == "," for c in str(path)):
            raise HostPathError(f"the kernel lane cannot re-expose {str(path)!r} in the guest "
                             "(whitespace or commas in the path); clone elsewhere")
    return [str(p) for p in kept]


def qemu_command(image: BootImage, exchange: Path, drives: list[str], *, memory_mib: int = 2048,
                 cpus: int = 2) -> list[str]:
    """The qemu command line: the host root and ``exchange`` over 9p, then ``drives``
    (extra ``-drive``/``-blockdev``/``-device`` arguments, in guest disk order)."""
    append = "console=ttyS0 quiet panic=-1 loglevel=4"
    keep = hidden_host_paths()
    if keep:
        append += " strata.keep=" + ",".join(keep)
    return [
        QEMU, "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-kernel", str(image.vmlinux), "-initrd", str(image.initrd),
        "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={exchange},mount_tag=xchg,security_model=none,multidevs=remap",
        *drives,
    ]


def prepare_exchange(exchange: Path, script: str) -> None:
    exchange.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "output.log"):
        (exchange / stale).unlink(missing_ok=True)
    (exchange / "run.sh").write_text(script)


def start_guest(cmd: list[str], console: Path) -> subprocess.Popen[bytes]:
    """Start qemu with its serial console written to ``console``; the caller waits or kills."""
    with open(console, "wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


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
    prepare_exchange(exchange, script)
    work = Path(tempfile.mkdtemp(prefix="strata-qemu-", dir=os.environ.get("STRATA_TEST_SCRATCH", "/var/tmp")))
    try:
        disk = work / "scratch.img"
        _scratch_disk(disk, disk_bytes)
        cmd = qemu_command(image, exchange, ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe,discard=unmap"],
                           memory_mib=memory_mib, cpus=cpus)
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
