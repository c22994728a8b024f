"""Backing filesystems for the benchmark, made and torn down by the benchmark itself.

Layout of one run (all under a fresh ``mkdtemp`` directory in ``/var/tmp`` by default)::

    <scratch>/ext4/          a plain directory on the root filesystem (ext4 on the CI machines)
    <scratch>/btrfs.img      a sparse file, formatted with mkfs.btrfs
    <scratch>/btrfs/         its mount point (loop device from ``losetup --find --show``)

:class:`BenchFilesystems` is a context manager: on exit — normal, error, Ctrl-C or a
SIGTERM turned into :class:`Interrupted` by :func:`terminate_as_interrupt` — it unmounts
every mount left under the scratch directory (deepest first, through :mod:`csi.host.mount`),
detaches the loop device and deletes the scratch directory. btrfs is optional: when the
kernel or btrfs-progs lacks it, :attr:`BenchFilesystems.unavailable` says why and the
btrfs-backed cases are reported as skipped.

Also here: :func:`fill_tree`, which writes a tree of incompressible data and fsyncs it,
and :func:`copy_tree`, the copy baseline (``cp -a --reflink=never``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from csi.host import mount as mnt
from csi.host.fsinfo import fstype_at, fsync_dir, kernel_has

MIB = 1 << 20
FILE_BYTES = 4 * MIB  # files of the data tree are this large (the last one may be smaller)
FILES_PER_DIR = 16
POOL_BYTES = 64 * MIB


class Interrupted(KeyboardInterrupt):
    """SIGTERM arrived; raised so that every ``finally`` tears its part down."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Interrupted` in the main thread."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)



@dataclass(frozen=True)
class Backing:
    """A backing filesystem: a name for the tables and a directory on it."""

    name: str  # "ext4" or "btrfs"
    path: Path

    def fresh_dir(self, label: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.path))
        return path


class BenchFilesystems:
    """The scratch directory, an ext4 directory and a btrfs loop filesystem."""

    def __init__(self, base: str | os.PathLike[str] = "/var/tmp", btrfs_bytes: int = 16 << 30,
                 want_btrfs: bool = True) -> None:
        self.base = Path(base)
        self.btrfs_bytes = btrfs_bytes
        self.want_btrfs = want_btrfs
        self.scratch = Path()
        self.loop_device: str | None = None
        self.backings: dict[str, Backing] = {}
        self.unavailable: dict[str, str] = {}

    def __enter__(self) -> BenchFilesystems:
        self.scratch = Path(tempfile.mkdtemp(prefix="strata-bench-", dir=self.base))
        try:
            ext4 = self.scratch / "ext4"
            ext4.mkdir()
            self.backings["ext4"] = Backing(fstype_at(ext4), ext4)
            if self.want_btrfs:
                self._make_btrfs()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _make_btrfs(self) -> None:
        if not kernel_has("btrfs"):
            self.unavailable["btrfs"] = "kernel has no btrfs"
            return
        if shutil.which("mkfs.btrfs") is None or shutil.which("losetup") is None:
            self.unavailable["btrfs"] = "btrfs-progs / losetup not installed (run .ci/setup)"
            return
        image = self.scratch / "btrfs.img"
        with open(image, "wb") as f:
            f.truncate(self.btrfs_bytes)
        subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
        self.loop_device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                          capture_output=True, text=True).stdout.strip()
        target = self.scratch / "btrfs"
        target.mkdir()
        mnt.mount(mnt.Mount("btrfs", self.loop_device, ()), target)
        self.backings["btrfs"] = Backing("btrfs", target)

    def close(self) -> None:
        """Unmount everything under the scratch dir, detach the loop device, delete it all."""
        if not self.scratch.parts:
            return
        for attempt in range(3):
            left = mnt.mounts_under(self.scratch)
            if not left:
                break
            for mp in left:
                try:
                    mnt.unmount(mp.target, detach=attempt > 0)
                except mnt.MountError:
                    pass
        if self.loop_device is not None:
            subprocess.run(["losetup", "-d", self.loop_device], check=False, capture_output=True)
            self.loop_device = None
        if not mnt.mounts_under(self.scratch):
            remove_tree(self.scratch)
        self.backings.clear()



class DataSource:
    """Incompressible bytes, fast: one ``os.urandom`` pool of 64 MiB, handed out as
    slices starting at distinct, odd (so never 4 KiB-aligned alike) offsets."""

    def __init__(self, pool_bytes: int = POOL_BYTES) -> None:
        self.pool = memoryview(os.urandom(pool_bytes + MIB))
        self.pool_bytes = pool_bytes
        self.counter = 0

    def chunk(self, size: int) -> memoryview:
        if size > MIB:
            raise ValueError("chunks are at most 1 MiB")
        self.counter += 1
        offset = (self.counter * 1_000_003) % self.pool_bytes
        return self.pool[offset:offset + size]


def write_file(path: Path, size: int, data: DataSource) -> None:
    """Write ``size`` bytes of ``data`` to a new file and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left > 0:
            n = min(left, MIB)
            os.write(fd, data.chunk(n))
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_tree(root: Path, total_bytes: int, data: DataSource) -> int:
    """Write ``total_bytes`` of data under ``root`` as 4 MiB files, 16 per directory,
    plus a symlink and an empty directory per directory; fsync files and directories.
    Returns the number of files written."""
    files, left, index = 0, total_bytes, 0
    dirs: list[Path] = []
    while left > 0:
        directory = root / f"d{index // FILES_PER_DIR:03d}"
        if index % FILES_PER_DIR == 0:
            directory.mkdir()
            (directory / "empty").mkdir()
            os.symlink(f"f{index:05d}", directory / "link")
            dirs.append(directory)
        size = min(left, FILE_BYTES)
        write_file(directory / f"f{index:05d}", size, data)
        left -= size
        files += 1
        index += 1
    for directory in [*dirs, root]:
        fsync_dir(directory)
    return files



def copy_tree(source: Path, target: Path) -> None:
    """The copy baseline: ``cp -a --reflink=never source target`` (no fsync)."""
    subprocess.run(["cp", "-a", "--reflink=never", "--", str(source), str(target)], check=True)


def remove_tree(path: Path) -> None:
    """Delete ``path``; frozen vfs layers are immutable (``chattr +i``), so when a plain
    removal leaves something behind the flag is cleared on the tree and it is tried again."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path) and shutil.which("chattr") is not None:
        subprocess.run(["chattr", "-R", "-f", "-i", str(path)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)



def format_size(size: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"
