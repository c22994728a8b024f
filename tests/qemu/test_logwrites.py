"""The write-log replayer of the power-cut lane (:mod:`tests.qemu.logwrites`), on logs
built here in the dm-log-writes format, and the guest's re-exposure of host paths the
guest's own mounts would hide (:func:`tests.qemu.guest.hidden_host_paths`)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from .guest import GuestError, hidden_host_paths
from .logwrites import DISCARD, FLUSH, FUA, LogError, read_log, replay, write_log

S = 512


def disk(tmp_path: Path, sectors: int = 16) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"." * S * sectors)
    return path


def test_replays_up_to_the_last_flush_only(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write_log(log, [(0, b"A" * S, 0), (2, b"B" * 2 * S, 0), (0, b"", FLUSH), (5, b"C" * S, 0)])
    parsed = read_log(log, 16)
    assert [e.index for e in parsed.entries] == [0, 1, 2, 3] and parsed.last_barrier == 2
    image = disk(tmp_path)
    result = replay(parsed, image, mode="flush")
    data = image.read_bytes()
    assert data[:S] == b"A" * S and data[2 * S:4 * S] == b"B" * 2 * S
    assert data[5 * S:6 * S] == b"." * S, "a write after the last flush is lost"
    assert (result.applied, result.dropped) == (2, 1)


def test_fua_write_is_a_barrier_and_discards_read_as_zeros(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write_log(log, [(1, b"", DISCARD), (3, b"F" * S, FUA)])
    # a discard entry carries its length in nr_sectors but no data: patch it to 2 sectors
    raw = bytearray(log.read_bytes())
    raw[S + 8:S + 16] = (2).to_bytes(8, "little")
    log.write_bytes(bytes(raw))
    image = disk(tmp_path)
    replay(read_log(log, 16), image)
    data = image.read_bytes()
    assert data[S:3 * S] == bytes(2 * S) and data[3 * S:4 * S] == b"F" * S


def test_entries_beyond_the_super_count_are_read_until_an_implausible_header(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write_log(log, [(0, b"A" * S, 0), (0, b"", FLUSH), (1, b"B" * S, 0), (0, b"", FLUSH)], nr_entries=2)
    with open(log, "ab") as f:
        f.write(bytes(8 * S))  # the rest of a sparse log file: zeros
    parsed = read_log(log, 16)
    assert len(parsed.entries) == 4 and parsed.last_barrier == 3
    image = disk(tmp_path)
    replay(parsed, image)
    assert image.read_bytes()[S:2 * S] == b"B" * S


def test_reorder_mode_keeps_a_subset_of_the_writes_after_the_flush(tmp_path: Path) -> None:
    log = tmp_path / "log"
    write_log(log, [(0, b"", FLUSH), *[(i, bytes([65 + i]) * S, 0) for i in range(12)]])
    image = disk(tmp_path)
    result = replay(read_log(log, 16), image, mode="reorder", rng=random.Random(3))
    data = image.read_bytes()
    kept = [i for i in range(12) if data[i * S:(i + 1) * S] == bytes([65 + i]) * S]
    assert 0 < len(kept) < 12 and result.applied == len(kept) and result.dropped == 12 - len(kept)


def test_not_a_log_and_a_short_log_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(4 * S))
    with pytest.raises(LogError, match="no dm-log-writes super"):
        read_log(bad)
    short = tmp_path / "short"
    write_log(short, [(0, b"A" * S, 0)], nr_entries=3)
    with pytest.raises(LogError):
        read_log(short, 16)


def test_hidden_host_paths() -> None:
    assert hidden_host_paths([Path("/work/main"), Path("/usr")]) == []
    assert hidden_host_paths([Path("/tmp/clone"), Path("/tmp/clone/.venv"), Path("/var/tmp/v")]) == \
        ["/tmp/clone", "/var/tmp/v"]
    with pytest.raises(GuestError, match="whitespace"):
        hidden_host_paths([Path("/tmp/my clone")])
    with pytest.raises(GuestError, match="replaces"):
        hidden_host_paths([Path("/dev/shm/clone")])
