"""Helpers of the backup tests: content with every kind of metadata, chains made through the
contract, a tree description to compare byte for byte, and running the OCI tools."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from csi.graphdriver.registry import new_driver


def make_driver(root: Path, name: str) -> object:
    return new_driver(root, name).driver


def _set(path: Path, mode: int, uid: int, gid: int, mtime_ns: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    if not path.is_symlink():
        os.chmod(path, mode)
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def fill_base(root: Path) -> None:
    """Layer 0: files with modes, owners, ns times, xattrs, a hard link, a symlink, a fifo,
    nested directories, an empty file."""
    (root / "etc").mkdir()
    (root / "data" / "deep" / "er").mkdir(parents=True)
    (root / "gone-dir" / "sub").mkdir(parents=True)
    (root / "opaque").mkdir()
    (root / "opaque" / "old1").write_bytes(b"old one")
    (root / "opaque" / "old2").write_bytes(b"old two")
    (root / "gone-dir" / "sub" / "f").write_bytes(b"x" * 5000)
    (root / "etc" / "config").write_bytes(b"key=value\n")
    (root / "data" / "big").write_bytes(os.urandom(300_000))
    (root / "data" / "deep" / "er" / "leaf").write_bytes(b"leaf")
    (root / "data" / "empty").write_bytes(b"")
    (root / "data" / "setuid").write_bytes(b"#!/bin/sh\n")
    os.link(root / "data" / "big", root / "data" / "big-link")
    os.symlink("../etc/config", root / "data" / "cfg-link")
    os.mkfifo(root / "data" / "fifo")
    (root / "remove-me").write_bytes(b"to be deleted")
    os.setxattr(root / "etc" / "config", "user.strata.test", b"\x00\x01binary\xff")
    os.setxattr(root / "data", "user.dir.attr", b"on a directory")
    _set(root / "data" / "setuid", 0o4755, 0, 0, 1_600_000_000_123_456_789)
    _set(root / "etc" / "config", 0o640, 1234, 5678, 1_500_000_000_000_000_001)
    _set(root / "data" / "big", 0o600, 1000, 1000, 1_650_000_000_999_999_999)
    _set(root / "data" / "cfg-link", 0o777, 42, 43, 1_400_000_000_500_000_000)
    _set(root / "data" / "deep" / "er" / "leaf", 0o444, 7, 8, 1_300_000_000_000_000_000)
    _set(root / "data" / "deep" / "er", 0o1777, 0, 0, 1_300_000_000_000_000_000)
    _set(root / "data", 0o750, 11, 12, 1_200_000_000_000_000_007)


def change_top(root: Path) -> None:
    """Layer 1: modify, add, delete a file and a directory (whiteouts), replace a directory
    (opaque), add a second hard link and a file in a new directory."""
    (root / "remove-me").unlink()
    shutil.rmtree(root / "gone-dir")
    shutil.rmtree(root / "opaque")
    (root / "opaque").mkdir()
    (root / "opaque" / "new").write_bytes(b"brand new")
    (root / "etc" / "config").write_bytes(b"key=changed\n")
    os.utime(root / "etc" / "config", ns=(1_700_000_000_000_000_001,) * 2)
    (root / "new-dir").mkdir()
    (root / "new-dir" / "file").write_bytes(os.urandom(70_000))
    os.link(root / "new-dir" / "file", root / "new-dir" / "file-link")
    os.setxattr(root / "new-dir" / "file", "user.second", b"2")
    os.chown(root / "new-dir" / "file", 99, 98)
    os.utime(root / "new-dir" / "file", ns=(1_710_000_000_000_000_000,) * 2)
    os.utime(root / "new-dir", ns=(1_720_000_000_000_000_000,) * 2)
    os.utime(root / "opaque", ns=(1_730_000_000_000_000_000,) * 2)


def make_chain(drv: object, prefix: str = "") -> tuple[str, str]:
    """Two frozen layers s0 <- s1 made through the contract; returns their IDs."""
    v0, s0, v1, s1 = (f"{prefix}v0", f"{prefix}s0", f"{prefix}v1", f"{prefix}s1")
    drv.create(v0)  # type: ignore[attr-defined]
    root = drv.get(v0)  # type: ignore[attr-defined]
    fill_base(root)
    drv.put(v0)  # type: ignore[attr-defined]
    drv.freeze(v0, s0)  # type: ignore[attr-defined]
    drv.create(v1, s0)  # type: ignore[attr-defined]
    root = drv.get(v1)  # type: ignore[attr-defined]
    change_top(root)
    drv.put(v1)  # type: ignore[attr-defined]
    drv.freeze(v1, s1)  # type: ignore[attr-defined]
    drv.remove(v0)  # type: ignore[attr-defined]
    drv.remove(v1)  # type: ignore[attr-defined]
    return s0, s1


def tree(root: Path) -> dict[str, tuple]:
    """Everything that must survive a round trip, per relative path (root itself excluded):
    type, mode, owner, mtime (ns; not for symlinks, whose own times tar tools may not set),
    size and content hash, link target, user xattrs, device numbers, hard-link group."""
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            content = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(full.read_bytes()).hexdigest()
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            link = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            try:
                xattrs = tuple(sorted((n, os.getxattr(full, n, follow_symlinks=False))
                                      for n in os.listxattr(full, follow_symlinks=False) if n.startswith("user.")))
            except OSError:
                xattrs = ()
            mtime = None if stat.S_ISLNK(st.st_mode) else st.st_mtime_ns
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else None, content, link, xattrs, st.st_rdev)
    for paths in inodes.values():
        group = tuple(sorted(paths))
        for p in paths:
            out[p] = out[p] + (group,)
    return out


def snapshot_tree(drv: object, layer_id: str) -> dict[str, tuple]:
    root = drv.get(layer_id)  # type: ignore[attr-defined]
    try:
        return tree(root)
    finally:
        drv.put(layer_id)  # type: ignore[attr-defined]


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt package {tool})")
