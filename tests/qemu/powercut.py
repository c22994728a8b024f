"""The power-cut lane: cut a guest's power at random moments while strata works, boot
again on the same disk, check what survived.

``python -m tests.qemu.powercut [--cuts N] [--seed S] [--drivers vfs,overlay,btrfs,devicemapper]``
(``STRATA_POWERCUT_CUTS`` sets the default N; ``tests/qemu/test_powercut.py`` runs it in CI).

How (N cuts = N+1 boots; every driver works in every boot, so one cut hits all of them):

* the host makes the *strata disk*, a sparse ext4 image that is the guest's ``/dev/vda``
  (init.sh mounts it at ``/var/tmp``); every driver's root, kubelet directory and journal
  state live there (btrfs: a loop file on it carrying a btrfs filesystem; devicemapper:
  ``dm.loopback`` files on it);
* each boot runs :mod:`tests.qemu.inguest.powercut_workload`: ``strata serve`` per driver
  (start-up recovery), verification against the driver's journal, then a random CSI
  workload; once every driver wrote its verification the host waits a random 1-8 s and
  kills qemu with SIGKILL (no shutdown, no sync);
* what the guest had not sent to its virtual disk is lost, but what qemu received
  survives in the host's page cache, so a plain kill keeps every write the disk got. To
  model a disk's volatile write cache, every ``LOG_EVERY``-th cut runs the disk through
  qemu's ``blklogwrites`` driver (the dm-log-writes format, logged before the guest sees
  a write or flush complete) and, after the kill, the disk is rebuilt from its state at
  boot plus the log replayed up to the last flush (alternately with a random half of the
  later writes, as a cache may write them out of order): :mod:`tests.qemu.logwrites`;
* the last boot verifies only and exits.

The result per driver: the verification errors of every boot (each names the boot), the
workload errors the guest journaled, how many cuts hit its workload, operation counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .guest import GuestError, prepare_exchange, qemu_command, start_guest
from .image import prepare
from .logwrites import read_log, replay

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = Path(__file__).with_name("inguest") / "powercut_workload.py"
DRIVERS = ("vfs", "overlay", "btrfs", "devicemapper")
DISK_BYTES = 3 << 30
LOG_BYTES = 16 << 30  # sparse; the log grows into it
LOG_EVERY = 3  # every third cut replays a write log (volatile write cache)
BOOT_TIMEOUT_S = int(os.environ.get("STRATA_POWERCUT_BOOT_TIMEOUT", "600"))


@dataclass
class DriverReport:
    driver: str
    cuts: int = 0  # cuts that hit this driver's workload (it had started calls in that boot)
    verified_boots: int = 0
    errors: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    serve_start_s: list[float] = field(default_factory=list)


@dataclass
class LaneReport:
    cuts: int
    boots: int
    seconds: float
    boot_seconds: list[float]
    logged_cuts: list[tuple[int, str, int, int]]  # (boot, mode, entries applied, dropped after the flush)
    drivers: dict[str, DriverReport]
    problems: list[str]  # lane-level (a boot that did not come up, a replay that failed)
    workdir: Path

    def summary(self) -> str:
        lines = [(f"power-cut lane: {self.cuts} cuts, {self.boots} boots in {self.seconds:.0f}s "
                 f"(boots {min(self.boot_seconds, default=0):.0f}-{max(self.boot_seconds, default=0):.0f}s), "
                 f"{len(self.logged_cuts)} with a replayed write log {self.logged_cuts}")]
        for d in self.drivers.values():
            ops = ", ".join(f"{k} {v}" for k, v in sorted(d.ops.items()))
            start = f"{min(d.serve_start_s):.0f}-{max(d.serve_start_s):.0f}s" if d.serve_start_s else "-"
            lines.append(f"  {d.driver}: {d.cuts} cuts hit its workload, {d.verified_boots} verifications, "
                         f"{len(d.errors)} errors; serve start {start}; {ops}")
            lines += [f"    ! {e[:600]}" for e in d.errors[:12]]
        lines += [f"  lane: {p}" for p in self.problems]
        return "\n".join(lines)


def make_disk(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-i", "65536", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(path)], check=True, capture_output=True)


def drive_args(disk: Path, log: Path | None) -> list[str]:
    if log is None:  # flushes are ignored: only a kill's loss is modelled
        return ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]
    with open(log, "wb") as f:
        f.truncate(LOG_BYTES)
    # cache=writeback so that the guest's flushes reach blklogwrites and are logged
    return ["-blockdev", f"driver=file,node-name=pcdisk,filename={disk},cache.direct=off",
            "-blockdev", f"driver=file,node-name=pclogfile,filename={log},cache.direct=off",
            "-blockdev", "driver=blklogwrites,node-name=pclog,file=pcdisk,log=pclogfile,log-sector-size=512",
            "-device", "virtio-blk-pci,drive=pclog"]


def journal_lines(exchange: Path, driver: str) -> list[dict[str, Any]]:
    path = exchange / f"journal-{driver}.jsonl"
    out = []
    if path.exists():
        for raw in path.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                pass
    return out


def run_lane(cuts: int, *, seed: int | None = None, drivers: tuple[str, ...] = DRIVERS,
             workdir: Path | None = None, log_every: int = LOG_EVERY, keep: bool = False,
             progress: Any = None) -> LaneReport:
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"power-cut lane: seed {seed}, {cuts} cuts, drivers {','.join(drivers)}")
    image = prepare()
    # byte-compile strata on the host once (the guest's tree is read-only and Python under
    # emulation spends seconds compiling it in every process); a broken module just stays uncompiled
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "csi")], check=False, capture_output=True,
                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    work = Path(workdir or tempfile.mkdtemp(prefix="strata-powercut-",
                                            dir=os.environ.get("STRATA_TEST_SCRATCH", "/var/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    exchange = work / "xchg"
    exchange.mkdir(exist_ok=True)
    disk = work / "strata.img"
    make_disk(disk)
    reports = {d: DriverReport(d) for d in drivers}
    problems: list[str] = []
    boot_seconds: list[float] = []
    logged: list[tuple[int, str, int, int]] = []
    started = time.monotonic()
    try:
        for boot in range(cuts + 1):
            final = boot == cuts
            use_log = not final and boot > 0 and log_every > 0 and boot % log_every == 0
            base = log = None
            if use_log:
                base, log = work / "base.img", work / "writes.log"
                subprocess.run(["cp", "--sparse=always", str(disk), str(base)], check=True)
            script = (f"cd {REPO}\nexec {sys.executable} {WORKLOAD} --boot {boot} --seed {seed} "
                      f"--drivers {','.join(drivers)}{' --final' if final else ''}\n")
            prepare_exchange(exchange, script)
            cmd = qemu_command(image, exchange, drive_args(disk, log))
            t0 = time.monotonic()
            proc = start_guest(cmd, work / f"console-{boot}.log")
            verify_files = [exchange / f"verify-{d}-{boot}.json" for d in drivers]
            deadline = t0 + BOOT_TIMEOUT_S
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    if not final and all(f.exists() for f in verify_files):
                        break
                    time.sleep(0.2)
                if final:
                    if proc.poll() is None:
                        problems.append(f"boot {boot}: the final boot did not finish within {BOOT_TIMEOUT_S}s")
                elif proc.poll() is not None:
                    problems.append(f"boot {boot}: the guest stopped before the cut (exit {proc.returncode}); "
                                    f"output: {(exchange / 'output.log').read_text(errors='replace')[-1500:] if (exchange / 'output.log').exists() else ''}"
                                    f" console: {(work / f'console-{boot}.log').read_text(errors='replace')[-800:]}")
                elif not all(f.exists() for f in verify_files):
                    problems.append(f"boot {boot}: verification did not finish within {BOOT_TIMEOUT_S}s")
                else:
                    time.sleep(rng.uniform(1.0, 8.0))
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)  # the power cut
                proc.wait()
            boot_seconds.append(time.monotonic() - t0)
            if use_log and base is not None and log is not None:
                mode = "flush" if (boot // log_every) % 2 else "reorder"
                try:
                    result = replay(read_log(log, DISK_BYTES // 512), base, mode=mode, rng=rng)
                    base.rename(disk)
                    logged.append((boot, mode, result.applied, result.dropped))
                except Exception as exc:  # noqa: BLE001 - a lane problem, reported
                    problems.append(f"boot {boot}: replaying the write log failed: {exc!r}")
                finally:
                    log.unlink(missing_ok=True)
            for d in drivers:
                vf = exchange / f"verify-{d}-{boot}.json"
                if vf.exists():
                    got = json.loads(vf.read_text())
                    reports[d].verified_boots += 1
                    if "serve_start_s" in got:
                        reports[d].serve_start_s.append(got["serve_start_s"])
                    for e in got.get("errors", []):
                        reports[d].errors.append(f"boot {boot} verification: {e}"
                                                 + (f"\n--- serve log ---\n{got.get('serve_log', '')}"
                                                    if e is got['errors'][0] else ""))
                    for k, v in got.get("stats", {}).items():
                        reports[d].ops[f"verify:{k}"] = reports[d].ops.get(f"verify:{k}", 0) + v
                else:
                    reports[d].errors.append(f"boot {boot}: no verification result from the guest")
            say(f"boot {boot}: {boot_seconds[-1]:.0f}s{' (write log replayed)' if use_log else ''}"
                f"{' final' if final else ' cut'}")
    finally:
        seconds = time.monotonic() - started
    for d in drivers:
        lines = journal_lines(exchange, d)
        hit = {e["b"] for e in lines if e.get("ph") == "begin"}
        reports[d].cuts = len([b for b in hit if b < cuts])
        for e in lines:
            if e.get("ph") == "ack" and e.get("b", cuts) < cuts:
                reports[d].ops[e["op"]] = reports[d].ops.get(e["op"], 0) + 1
            if e.get("op") == "error" and e.get("b", 0) < cuts and not _is_verify_error(e, exchange, d):
                reports[d].errors.append(f"boot {e['b']} workload: {e.get('msg', '')}")
    report = LaneReport(cuts, len(boot_seconds), seconds, boot_seconds, logged, reports, problems, work)
    if not keep and not problems and all(not r.errors for r in reports.values()):
        shutil.rmtree(work, ignore_errors=True)
    return report


def _is_verify_error(entry: dict[str, Any], exchange: Path, driver: str) -> bool:
    """Errors the verification journaled are already in its result file."""
    vf = exchange / f"verify-{driver}-{entry['b']}.json"
    if not vf.exists():
        return False
    return entry.get("msg", "")[:2000] in [e[:2000] for e in json.loads(vf.read_text()).get("errors", [])]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.qemu.powercut", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=int(os.environ.get("STRATA_POWERCUT_CUTS", "10")))
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--drivers", default=",".join(DRIVERS))
    ap.add_argument("--log-every", type=int, default=LOG_EVERY, help="replay a write log every Nth cut (0: never)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (disk, journals, consoles)")
    args = ap.parse_args(argv)
    try:
        report = run_lane(args.cuts, seed=args.seed, drivers=tuple(args.drivers.split(",")),
                          log_every=args.log_every, keep=args.keep)
    except GuestError as exc:
        print(f"power-cut lane could not run: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"work directory: {report.workdir}" + ("" if report.workdir.exists() else " (removed)"))
    failed = report.problems or any(r.errors for r in report.drivers.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
