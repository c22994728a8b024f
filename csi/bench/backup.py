"""The backup benchmark (``strata bench --parts backup``): export, backup and restore of a
snapshot through a real registry, each next to a baseline measured in the same run.

One case per driver (vfs on ext4, overlay on ext4, btrfs), with a snapshot holding ``size``
bytes (the largest ``--sizes``; 1 GiB in the full run) of incompressible 4 MiB files:

* **export** — ``driver.diff(snapshot)`` drained vs ``tar -c`` of the same tree; with zstd
  (level 3, the backup's) vs ``tar -c | zstd -3`` of the same tree;
* **full backup** — :func:`csi.backup.backup` into a Debian ``docker-registry`` the benchmark
  starts on 127.0.0.1 (fresh storage under the case directory, stopped and removed after) vs
  ``skopeo copy --preserve-digests`` of the same artifact from an OCI layout to another
  repository of that registry;
* **full restore** — :func:`csi.backup.restore` of it on a fresh driver root (another node) vs
  ``skopeo copy`` from the registry to a fresh OCI layout;
* **incremental** — a child of the snapshot gets a new 1 MiB file and is frozen; the backup of
  that snapshot (with the export cache: the parent layer is known to the registry) — bytes sent
  and time; goal ≤ 2 MiB and ≤ 0.5 s on btrfs and overlay (vfs: reported, what it sends);
* **restore on a node holding the parent** — the second artifact restored on the node of the
  full restore moves only the new layer (goal: one layer imported, ≤ 2 MiB pulled).

Every time is one run after an ``os.sync()``; the page cache is warm.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import requests
import zstandard

from csi.backup import ExportIndex, backup, restore
from csi.backup.export import ZSTD_LEVEL
from csi.backup.layout import LayoutTarget
from csi.backup.registry import RegistryTarget
from csi.bench.drivers import (DriverCase, Ledger, _diff_bytes, _drain, _settle, _tar_bytes, close_driver, ledger,
                               open_driver)
from csi.bench.fsenv import MIB, Backing, DataSource, fill_tree, format_size, remove_tree, write_file
from csi.bench.report import Goal, Section, Table, at_most, mbps, ms, timed, with_ratio
from csi.errors import StrataError

REGISTRY_BIN = "/usr/bin/docker-registry"
GOAL_INCR_BYTES = 2 * MIB
GOAL_INCR_S = 0.5
GOAL_DRIVERS = ("overlay", "btrfs")
BACKUP_CASES: tuple[DriverCase, ...] = (DriverCase("vfs", "ext4"), DriverCase("overlay", "ext4"),
                                        DriverCase("btrfs", "btrfs"))


@dataclass(frozen=True)
class BackupConfig:
    size: int
    change_bytes: int = MIB


@dataclass(frozen=True)
class BackupFigures:
    size: int
    tar_s: float
    export_s: float
    export_bytes: int
    zstd_tool_s: float
    zstd_tool_bytes: int
    export_zstd_s: float
    export_zstd_bytes: int
    push_s: float
    push_bytes: int
    skopeo_push_s: float
    restore_s: float
    restore_bytes: int
    skopeo_pull_s: float
    incr_s: float
    incr_bytes: int
    incr_blobs_sent: int
    incr_restore_s: float
    incr_restore_bytes: int
    incr_restore_layers: int


@dataclass(frozen=True)
class BackupResult:
    case: DriverCase
    figures: BackupFigures | None = None
    error: str | None = None


class BackupBenchError(StrataError):
    """A tool the benchmark runs failed, or a figure would be meaningless."""


def missing_tools() -> str:
    """Why the part cannot run here ('' when it can)."""
    missing = [t for t in ("skopeo", "zstd", "tar") if shutil.which(t) is None]
    if not Path(REGISTRY_BIN).exists():
        missing.append("docker-registry")
    return f"not installed: {', '.join(missing)}" if missing else ""


@contextmanager
def local_registry(directory: Path) -> Iterator[str]:
    """A ``docker-registry`` on a free 127.0.0.1 port with its storage in ``directory``;
    yields ``host:port``; stops it and removes the storage afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory.mkdir(parents=True)
    config = directory / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n"
                      f"  filesystem:\n    rootdirectory: {directory / 'storage'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    with open(directory / "registry.log", "wb") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BackupBenchError("docker-registry did not start: "
                                           + (directory / "registry.log").read_text()[-500:]) from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:  # it ignored SIGTERM
            proc.kill()
            proc.wait()
        remove_tree(directory)


def _tool(*argv: str) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise BackupBenchError(f"{argv[0]} {argv[1]} exited with {proc.returncode}: {proc.stderr.strip()[-400:]}")


def _tar_zstd_bytes(tree: Path) -> int:
    tar = subprocess.Popen(["tar", "-c", "-f", "-", "-C", str(tree), "."], stdout=subprocess.PIPE)
    zstd = subprocess.Popen(["zstd", f"-{ZSTD_LEVEL}", "-T1", "-q", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE)
    assert tar.stdout is not None and zstd.stdout is not None
    tar.stdout.close()
    try:
        total = _drain(zstd.stdout)
    finally:
        zstd.stdout.close()
        codes = (tar.wait(), zstd.wait())
    if codes != (0, 0):
        raise BackupBenchError(f"tar -c | zstd exited with {codes}")
    return total


def _diff_zstd_bytes(driver: object, layer_id: str) -> int:
    raw: IO[bytes] = driver.diff(layer_id, None)  # type: ignore[attr-defined]
    try:
        with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_reader(raw, closefd=False) as packed:
            return _drain(packed)  # type: ignore[arg-type]
    finally:
        raw.close()


def _snapshot(driver: object, book: Ledger, parent: str | None, fill: Callable[[Path], object]) -> str:
    volume = book.new_id("bv")
    driver.create(volume, parent)  # type: ignore[attr-defined]
    fill(book.get(volume))
    book.put(volume)
    frozen = book.new_id("bs")
    driver.freeze(volume, frozen)  # type: ignore[attr-defined]
    _settle()
    return frozen


def measure(case: DriverCase, backing: Backing, host: str, config: BackupConfig, data: DataSource,
            progress: Callable[[str], None]) -> BackupFigures:
    driver = open_driver(case, backing)
    other = open_driver(case, backing)  # the node a restore happens on
    work = backing.fresh_dir("backup-work")
    repo = f"bench/{case.driver}-{case.backing}"
    try:
        with ledger(driver) as book, closing(RegistryTarget(host, repo, scheme="http")) as target:
            progress(f"backup {case.label}: filling {format_size(config.size)}")
            s0 = _snapshot(driver, book, None, lambda root: fill_tree(root, config.size, data))
            tree = book.get(s0)
            progress(f"backup {case.label}: export vs tar -c, with zstd vs tar | zstd")
            tar_s, tar_bytes = timed(lambda: _tar_bytes(tree))
            export_s, export_bytes = timed(lambda: _diff_bytes(driver, s0))
            zstd_tool_s, zstd_tool_bytes = timed(lambda: _tar_zstd_bytes(tree))
            export_zstd_s, export_zstd_bytes = timed(lambda: _diff_zstd_bytes(driver, s0))
            book.put(s0)
            if min(export_bytes, tar_bytes) < config.size:
                raise BackupBenchError(f"export ({export_bytes} B) or tar ({tar_bytes} B) shorter than the data")
            progress(f"backup {case.label}: full backup to the registry vs skopeo copy")
            index = ExportIndex(work / "export-index.json")
            _settle()
            push_s, full = timed(lambda: backup(driver, s0, target, tag="full", index=index))
            layout = work / "layout"
            backup(driver, s0, LayoutTarget(layout, create=True), tag="full")
            _settle()
            skopeo_push_s, _ = timed(lambda: _tool(
                "skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:full",
                f"docker://{host}/bench/skopeo-{case.driver}:full"))
            progress(f"backup {case.label}: full restore on a fresh root vs skopeo copy")
            _settle()
            restore_s, got = timed(lambda: restore(other, target, full.manifest_digest))
            skopeo_pull_s, _ = timed(lambda: _tool(
                "skopeo", "copy", "-q", "--preserve-digests", "--src-tls-verify=false",
                f"docker://{host}/{repo}@{full.manifest_digest}", f"oci:{work / 'pulled'}:full"))
            progress(f"backup {case.label}: incremental backup and restore after a {format_size(config.change_bytes)} change")
            s1 = _snapshot(driver, book, s0, lambda root: write_file(root / "changed", config.change_bytes, data))
            incr_s, incr = timed(lambda: backup(driver, s1, target, tag="incr", index=index))
            _settle()
            incr_restore_s, again = timed(lambda: restore(other, target, incr.manifest_digest))
            if again.reused != (got.layer_id,):
                raise BackupBenchError(f"the second restore did not reuse the first one's layer: {again.reused}")
    finally:
        close_driver(other)
        close_driver(driver)
        remove_tree(work)
    return BackupFigures(config.size, tar_s, export_s, export_bytes, zstd_tool_s, zstd_tool_bytes, export_zstd_s,
                         export_zstd_bytes, push_s, full.bytes_sent, skopeo_push_s, restore_s, got.bytes_pulled,
                         skopeo_pull_s, incr_s, incr.bytes_sent, incr.blobs_sent, incr_restore_s, again.bytes_pulled,
                         len(again.imported))


def run(backings: dict[str, Backing], unavailable: dict[str, str], config: BackupConfig, drivers: tuple[str, ...],
        progress: Callable[[str], None]) -> tuple[list[BackupResult], list[tuple[str, str]]]:
    results: list[BackupResult] = []
    skipped: list[tuple[str, str]] = []
    cases = [c for c in BACKUP_CASES if c.driver in drivers]
    why = missing_tools()
    if why:
        return results, [(f"backup {c.label}", why) for c in cases]
    data = DataSource()
    first = next(iter(backings.values()))
    with local_registry(first.fresh_dir("registry") / "registry") as host:
        for case in cases:
            if case.backing not in backings:
                skipped.append((f"backup {case.label}", unavailable.get(case.backing, f"no {case.backing} filesystem")))
                continue
            try:
                results.append(BackupResult(case, measure(case, backings[case.backing], host, config, data, progress)))
            except (StrataError, OSError, subprocess.SubprocessError) as exc:
                results.append(BackupResult(case, error=f"{type(exc).__name__}: {exc}"))
    return results, skipped


def _rate(size: int, seconds: float) -> str:
    return mbps(size / seconds) if seconds > 0 else "-"


def _mib(n: int) -> str:
    return f"{n / MIB:.2f} MiB"


def goals(results: list[BackupResult]) -> list[Goal]:
    found: list[Goal] = []
    for r in results:
        f = r.figures
        label = r.case.label
        if r.case.driver in GOAL_DRIVERS:
            size = None if f is None else f.incr_bytes
            found.append(Goal(f"backup {label}: bytes sent after a 1 MiB change", "<= 2 MiB",
                              "n/a" if size is None else _mib(size), None if size is None else size <= GOAL_INCR_BYTES))
            found.append(at_most(f"backup {label}: incremental backup time", None if f is None else f.incr_s,
                                 GOAL_INCR_S))
        ok = None if f is None else (f.incr_restore_layers == 1 and f.incr_restore_bytes <= GOAL_INCR_BYTES)
        found.append(Goal(f"backup {label}: restore next to the parent moves only the new layer",
                          "1 layer, <= 2 MiB", "n/a" if f is None else
                          f"{f.incr_restore_layers} layer(s), {_mib(f.incr_restore_bytes)}", ok))
    return found


def section(results: list[BackupResult], skipped: list[tuple[str, str]], config: BackupConfig) -> Section:
    export_rows, registry_rows, incr_rows, errors = [], [], [], []
    for r in results:
        f = r.figures
        if f is None:
            errors.append((f"backup {r.case.label}", f"FAILED: {r.error}"))
            continue
        label, size = r.case.label, format_size(f.size)
        export_rows.append((label, size, ms(f.tar_s), with_ratio(f.export_s, f.tar_s), _rate(f.size, f.export_s),
                            ms(f.zstd_tool_s), with_ratio(f.export_zstd_s, f.zstd_tool_s),
                            f"{f.export_zstd_bytes / f.export_bytes:.3f}"))
        registry_rows.append((label, size, ms(f.skopeo_push_s), with_ratio(f.push_s, f.skopeo_push_s),
                              _rate(f.push_bytes, f.push_s), ms(f.skopeo_pull_s),
                              with_ratio(f.restore_s, f.skopeo_pull_s), _rate(f.restore_bytes, f.restore_s)))
        incr_rows.append((label, _mib(f.incr_bytes), str(f.incr_blobs_sent), ms(f.incr_s),
                          _mib(f.incr_restore_bytes), str(f.incr_restore_layers), ms(f.incr_restore_s)))
    tables = (
        Table("Export of a snapshot vs tar -c of its tree",
              ("driver", "size", "tar -c", "export", "export rate", "tar | zstd -3", "export zstd", "zstd ratio"),
              tuple(export_rows),
              ("export = driver.diff drained (sendfile into a pipe); export zstd = the same through zstandard level "
               f"{ZSTD_LEVEL} in-process; (xN) = N times faster than the baseline, (/N) slower",
               "data: incompressible 4 MiB files; one timed run each, page cache warm")),
        Table("Full backup and restore through a local docker-registry vs skopeo copy",
              ("driver", "size", "skopeo push", "backup", "backup rate", "skopeo pull", "restore", "restore rate"),
              tuple(registry_rows),
              ("skopeo push = skopeo copy --preserve-digests of the same artifact, OCI layout -> another repository; "
               "skopeo pull = registry -> a fresh OCI layout",
               "backup = diff, sha256, chunked upload (8 MiB PATCHes); restore = pull, verify, apply_diff and freeze "
               "on a fresh driver root")),
        Table(f"Incremental backup after a {format_size(config.change_bytes)} change, and its restore next to the parent",
              ("driver", "bytes sent", "blobs sent", "backup time", "restore pulled", "layers imported", "restore time"),
              tuple(incr_rows),
              ("the change is a new file in a child of the snapshot, frozen; the parent layer is skipped (export cache "
               "+ HEAD); restore on the node that restored the full backup",)),
    )
    raw = {"cases": [{"case": r.case.label, "figures": asdict(r.figures) if r.figures else None, "error": r.error}
                     for r in results]}
    return Section("Backup", tables, tuple(goals(results)), raw, tuple(skipped) + tuple(errors))
