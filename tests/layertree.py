"""Comparable pictures of directory trees, and the trees the driver checks build.

* :func:`tree_state` — per path: type, permission bits, owner, content digest / link
  target / device number, xattrs (drivers' private ``trusted.overlay.*`` left out),
  mtime in ns, and the group of paths that share an inode (hard links).
* :func:`assert_same_tree` — fails naming the paths that differ.
* :func:`populate` — a tree with every kind of thing a layer must preserve;
  :func:`mutate` — every kind of change a diff must carry, applied to it.

Shared by the conformance suite (``conformance.py``) and the state machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Any

FileState = tuple[Any, ...]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    # overlay's own private attributes are not content
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names
                        if not n.startswith("trusted.overlay.")))


def tree_state(root: Path, *, mtimes: bool = True) -> dict[str, FileState]:
    """A comparable picture of everything below ``root`` (not ``root`` itself): per path
    type, permission bits, owner, content digest / link target / device number, xattrs,
    mtime (ns, unless ``mtimes`` is False) and, for hard-linked files, the group of paths
    sharing the inode."""
    result: dict[str, FileState] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    pending = [Path(root)]
    while pending:  # iterative: os.walk recurses, and layers may nest deeper than that
        directory = pending.pop()
        for name in sorted(os.listdir(directory)):
            path = directory / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISDIR(kind):
                pending.append(path)
            if stat.S_ISREG(kind):
                body: Any = (st.st_size, _digest(path))
            elif stat.S_ISLNK(kind):
                body = os.readlink(path)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                body = st.st_rdev
            else:
                body = None
            when = st.st_mtime_ns if mtimes else 0
            result[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, body, _xattrs(path), when)
            if not stat.S_ISDIR(kind):
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    # hard links: the paths that really share an inode (st_nlink is not trusted: overlay
    # keeps reporting a lower file's count after one of its names was whited out)
    for group in inodes.values():
        if len(group) > 1:
            for rel in group:
                result[rel] = (*result[rel], tuple(sorted(group)))
    return result


def assert_same_tree(a: Path, b: Path, *, mtimes: bool = True) -> None:
    sa, sb = tree_state(a, mtimes=mtimes), tree_state(b, mtimes=mtimes)
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    differ = sorted(k for k in set(sa) & set(sb) if sa[k] != sb[k])
    assert not (only_a or only_b or differ), (
        f"trees differ: only in {a}: {only_a}; only in {b}: {only_b}; "
        f"different: {[(k, sa[k], sb[k]) for k in differ[:5]]}"
    )


T0 = 1_600_000_000_123_456_789  # a fixed mtime (ns) so trees made at different times compare


def populate(root: Path, *, device_nodes: bool = True) -> None:
    """A tree with every kind of thing a layer must preserve."""
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_text("key = value\n")
    (root / "bin").mkdir(mode=0o755)
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 40)
    os.chmod(root / "bin" / "tool", 0o4755)
    (root / "data").mkdir()
    (root / "data" / "owned").write_text("owned by 1234:5678\n")
    os.chown(root / "data" / "owned", 1234, 5678)
    os.chmod(root / "data" / "owned", 0o640)
    (root / "data" / "deep" / "er").mkdir(parents=True)
    (root / "data" / "deep" / "er" / "leaf").write_text("leaf")
    (root / "data" / "to-delete").write_text("bye")
    (root / "data" / "dir-to-delete" / "sub").mkdir(parents=True)
    (root / "data" / "dir-to-delete" / "sub" / "x").write_text("x")
    (root / "replace-me").mkdir()
    (root / "replace-me" / "old1").write_text("old1")
    (root / "replace-me" / "old2").write_text("old2")
    (root / "hard-a").write_text("shared inode")
    os.link(root / "hard-a", root / "hard-b")
    os.symlink("etc/conf", root / "link-rel")
    os.symlink("/nonexistent/target", root / "link-dangling")
    os.setxattr(root / "etc" / "conf", "user.note", b"hello")
    os.setxattr(root / "etc" / "conf", "trusted.tag", b"\x00\x01binary")
    os.setxattr(root / "data", "trusted.dirattr", b"d")
    with open(root / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    if device_nodes:
        os.mknod(root / "null-dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mkfifo(root / "fifo", 0o644)
    set_mtimes(root)


def set_mtimes(root: Path, when_ns: int = T0) -> None:
    """Give everything below ``root`` a fixed mtime (deepest first, symlinks too)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, ns=(when_ns, when_ns), follow_symlinks=False)


def mutate(root: Path) -> None:
    """Every kind of change a diff must carry, applied to a copy of :func:`populate`."""
    (root / "etc" / "conf").write_text("key = other\n")  # same size, new content
    with open(root / "bin" / "tool", "ab") as f:
        f.write(b"appended")
    os.chmod(root / "etc", 0o700)
    os.chown(root / "data" / "deep" / "er" / "leaf", 42, 43)
    (root / "data" / "to-delete").unlink()
    shutil.rmtree(root / "data" / "dir-to-delete")
    shutil.rmtree(root / "replace-me")
    (root / "replace-me").mkdir()
    (root / "replace-me" / "new").write_text("new")
    os.link(root / "hard-a", root / "data" / "hard-c")
    os.unlink(root / "link-rel")
    os.symlink("bin/tool", root / "link-rel")
    os.setxattr(root / "bin" / "tool", "user.added", b"1")
    os.removexattr(root / "etc" / "conf", "user.note")
    (root / "new-dir" / "inner").mkdir(parents=True)
    (root / "new-dir" / "inner" / "file").write_bytes(os.urandom(100_000))
    os.utime(root / "data" / "owned", ns=(T0 + 5, T0 + 5))
