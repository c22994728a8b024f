"""csi.host.freeze on the real kernel: FIFREEZE/FITHAW on a loop ext4 filesystem (writers
block while frozen, continue after the thaw, also when the block raises), and the writer
hold (held_writers) that group snapshots use where a freeze would block strata itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import Unsupported
from csi.host import freeze as fz
from csi.host import mount as mnt


@pytest.fixture
def ext4_loop(tmp_path: Path) -> Iterator[Path]:
    yield from _ext4_loop(tmp_path, "fs")


def _ext4_loop(tmp_path: Path, name: str) -> Iterator[Path]:
    image, mp = tmp_path / f"{name}.img", tmp_path / f"{name}-mnt"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mp.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mp)], check=True)
    try:
        yield mp
    finally:
        fz.thaw(mp)
        mnt.unmount(mp, detach=True)


def test_freeze_blocks_writers_until_thaw(ext4_loop: Path) -> None:
    done = threading.Event()

    def write() -> None:
        with open(ext4_loop / "f", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        done.set()

    with pytest.raises(RuntimeError), fz.frozen([ext4_loop, ext4_loop]):  # the same filesystem: frozen once
        threading.Thread(target=write, daemon=True).start()
        assert not done.wait(0.5), "a write went through a frozen filesystem"
        raise RuntimeError("the block fails: the filesystem must still be thawed")
    assert done.wait(5), "the writer did not continue after the thaw"
    assert (ext4_loop / "f").stat().st_size == 4096


def test_a_failed_thaw_still_thaws_the_others(ext4_loop: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real filesystems frozen together; the thaw of the one thawed first fails (the
    failure is injected after the real thaw ran: the kernel cannot be made to refuse one on
    demand): the other is thawed all the same, and the failure is reported."""
    second_fs = _ext4_loop(tmp_path, "second")
    second = next(second_fs)
    real_thaw = fz.thaw

    def thaw(mp: Path) -> None:
        real_thaw(mp)
        if Path(mp) == second:
            raise OSError(5, "injected")

    monkeypatch.setattr(fz, "thaw", thaw)
    try:
        with pytest.raises(fz.StrataError, match="injected"), fz.frozen([ext4_loop, second]):
            pass
        done = threading.Event()
        threading.Thread(target=lambda: ((ext4_loop / "after").write_bytes(b"x"), done.set()), daemon=True).start()
        assert done.wait(5), "the first filesystem stayed frozen after the other's thaw failed"
    finally:
        monkeypatch.undo()
        next(second_fs, None)


def test_freeze_unsupported_on_tmpfs(tmp_path: Path) -> None:
    mp = tmp_path / "tmpfs"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mp)], check=True)
    try:
        assert not fz.supports_freeze("tmpfs")
        with pytest.raises(Unsupported):
            fz.freeze(mp)
    finally:
        mnt.unmount(mp, detach=True)


def test_held_writers_stops_and_continues(tmp_path: Path) -> None:
    data = tmp_path / "vol"
    data.mkdir()
    other = tmp_path / "elsewhere"
    other.mkdir()
    code = "import os,sys,time\nfd=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT|os.O_APPEND)\n" \
           "while True:\n    os.write(fd,b'x')\n    time.sleep(0.001)\n"
    writer = subprocess.Popen([sys.executable, "-c", code, str(data / "log")])
    bystander = subprocess.Popen([sys.executable, "-c", code, str(other / "log")])
    try:
        while not (data / "log").exists() or not (other / "log").exists():
            time.sleep(0.01)
        with fz.held_writers(paths=[data]) as held:
            assert held == [writer.pid]
            size = (data / "log").stat().st_size
            time.sleep(0.2)
            assert (data / "log").stat().st_size == size, "a held writer wrote"
            assert fz._state(writer.pid) == "T" and fz._state(bystander.pid) != "T"  # noqa: SLF001
        time.sleep(0.2)
        assert (data / "log").stat().st_size > size and fz._state(writer.pid) != "T"  # noqa: SLF001
    finally:
        for p in (writer, bystander):
            p.kill()
            p.wait()
