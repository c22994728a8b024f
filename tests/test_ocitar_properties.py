"""Property tests of the one OCI tar codec (csi.graphdriver.diff.ocitar), checked against
Python's ``tarfile`` reader, on the edge cases where the two codecs it replaced disagreed:
negative and fractional times (the overlay copy wrote -1 ns as ``-1.999999999``), sizes
past the ustar field, odd names (not UTF-8, long, deep), binary xattr values, hard links.

* headers alone (no file data): whatever the stat says, ``tarfile`` reads back the same
  name, size, owner, mode, xattrs, and an mtime whose float is the nearest to the exact
  nanoseconds, which :func:`parse_ns` recovers exactly;
* real trees: the stream written to a file descriptor (sendfile) and to an in-memory sink
  are the same bytes, :class:`TarSizer` counts exactly them, ``tarfile`` reads every
  entry as on disk, and applying the stream reproduces the tree;
* sparse files (random data segments and holes): PAX 1.0 sparse members exactly when a file
  has holes, a stream about the size of the data, read back by ``tarfile`` and extracted by GNU
  tar and by the applier to the same tree with no more blocks allocated than the source; a
  map pointing outside its file is refused.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from conformance import assert_same_tree
from csi.errors import InvalidArgument
from csi.graphdriver.diff.ocitar import (LayerTarWriter, TarSizer, apply_tar, format_ns, header_bytes, parse_ns,
                                         tarinfo_for)

NS = 10**9
# -2**40 s .. 2**40 s around the epoch, with every interesting fraction near 0 and 1 s
times = st.one_of(
    st.integers(min_value=-(2**40) * NS, max_value=2**40 * NS),
    st.sampled_from([-1, 1, -NS, -NS - 1, -NS + 1, NS - 1, -999_999_999, -1_500_000_000, 0]),
    st.integers(min_value=-3, max_value=3).flatmap(lambda s: st.integers(min_value=-2, max_value=2).map(
        lambda f: s * NS + f)),
)
name_bytes = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b"..") and not b.startswith(b".wh."))
names = name_bytes.map(os.fsdecode)
xattr_values = st.binary(max_size=300)
xattrs = st.dictionaries(st.text(alphabet="abcdefghij._-0123456789", min_size=1, max_size=20).map(
    lambda n: "user." + n), xattr_values, max_size=4)
sizes = st.one_of(st.integers(min_value=0, max_value=2**63 - 1), st.sampled_from([8**11 - 1, 8**11, 2**33, 2**40]))


def _stat(mode: int, size: int, mtime_ns: int, uid: int, gid: int) -> os.stat_result:
    # st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size, st_atime, st_mtime, st_ctime,
    # then the float times and the ns times (index 16: st_mtime_ns)
    fields = [mode, 1, 1, 1, uid, gid, size, 0, mtime_ns // NS, 0, 0.0, mtime_ns / NS, 0.0, 0, mtime_ns, 0]
    return os.stat_result(fields)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.lists(names, min_size=1, max_size=4).map("/".join), mtime_ns=times, size=sizes,
       uid=st.integers(min_value=0, max_value=2**32 - 2), gid=st.integers(min_value=0, max_value=2**32 - 2),
       mode=st.integers(min_value=0, max_value=0o7777), values=xattrs)
def test_header_read_back_by_tarfile(name: str, mtime_ns: int, size: int, uid: int, gid: int, mode: int,
                                     values: dict[str, bytes]) -> None:
    with tempfile.NamedTemporaryFile() as probe:  # where the xattrs are read from
        for key, value in values.items():
            os.setxattr(probe.name, key, value)
        info = tarinfo_for(probe.name, name, _stat(stat.S_IFREG | mode, size, mtime_ns, uid, gid))
    assert info is not None
    stream = io.BytesIO(header_bytes(info) + bytes(2 * tarfile.BLOCKSIZE))
    with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
        member = tar.next()
        assert member is not None
        assert (member.name, member.size, member.uid, member.gid, member.mode) == (name, size, uid, gid, mode)
        assert parse_ns(member) == mtime_ns
        # tarfile's own float is the nearest double to the exact time (what any reader sees)
        assert member.mtime == float(format_ns(mtime_ns))
        assert abs(member.mtime * NS - mtime_ns) <= max(1.0, abs(mtime_ns) * 2**-52)
        read = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert read == values


@given(ns=times)
def test_pax_time_is_the_signed_decimal(ns: int) -> None:
    text = format_ns(ns)
    whole, _, fraction = text.lstrip("-").partition(".")
    assert len(fraction) == 9 and text.startswith("-") == (ns < 0)
    assert (int(whole) * NS + int(fraction)) * (-1 if ns < 0 else 1) == ns
    if ns == -1:
        assert text == "-0.000000001"


_entries = st.lists(
    st.tuples(st.lists(names, min_size=1, max_size=3).map(tuple), st.binary(max_size=3000), times, xattrs,
              st.booleans()),
    min_size=1, max_size=6,
)


def _build(root: Path, entries: list[tuple[tuple[str, ...], bytes, int, dict[str, bytes], bool]]) -> None:
    made: list[Path] = []
    for parts, data, mtime_ns, values, link in entries:
        path = root.joinpath(*parts)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            continue  # a file already holds that name
        if path.exists():
            continue
        if link and made:
            os.link(made[0], path)
            continue
        path.write_bytes(data)
        for key, value in values.items():
            os.setxattr(path, key, value)
        os.utime(path, ns=(0, mtime_ns))
        made.append(path)
    for directory, _, _ in os.walk(root):
        os.utime(directory, ns=(0, entries[0][2]))


def _written(root: Path, out: io.BytesIO | TarSizer | object) -> None:
    with LayerTarWriter(out) as writer:  # type: ignore[arg-type]
        for directory, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(directory) / name
                writer.add(path, os.path.relpath(path, root))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=_entries)
def test_trees_round_trip_through_tarfile_and_apply(entries: list[tuple[tuple[str, ...], bytes, int,
                                                                        dict[str, bytes], bool]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="ocitar-prop-"))
    try:
        src, dst = work / "src", work / "dst"
        src.mkdir()
        dst.mkdir()
        _build(src, entries)
        memory, sizer = io.BytesIO(), TarSizer()
        _written(src, memory)
        _written(src, sizer)
        with open(work / "layer.tar", "wb") as f:  # a real descriptor: data goes by sendfile(2)
            _written(src, f)
        data = memory.getvalue()
        assert (work / "layer.tar").read_bytes() == data and sizer.count == len(data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
            for member in tar:
                path = src / member.name
                st_ = os.lstat(path)
                assert parse_ns(member) == st_.st_mtime_ns or member.islnk()
                if member.isreg():
                    extracted = tar.extractfile(member)
                    assert extracted is not None and extracted.read() == path.read_bytes()
                elif member.islnk():
                    assert os.stat(src / member.linkname).st_ino == st_.st_ino
        assert apply_tar(dst, io.BytesIO(data)) == sum(
            len(p.read_bytes()) for p in {(os.lstat(p).st_ino): p for p in src.rglob("*") if p.is_file()}.values())
        os.utime(dst, ns=(0, os.lstat(src).st_mtime_ns))  # the roots are not part of the stream
        assert_same_tree(src, dst)
    finally:
        shutil.rmtree(work)


# -- sparse files: PAX 1.0 sparse members (GNU.sparse.major=1, minor=0) when a file has holes

_BLOCK = 4096
_segments = st.lists(st.tuples(st.integers(min_value=0, max_value=600), st.binary(min_size=1, max_size=9000)),
                     max_size=5)


def _sparse_file(path: Path, writes: list[tuple[int, bytes]], size_blocks: int) -> None:
    with open(path, "wb") as f:
        for block, data in writes:
            f.seek(block * _BLOCK)
            f.write(data)
        f.truncate(max(f.tell(), size_blocks * _BLOCK))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(_segments, st.integers(min_value=0, max_value=700)), min_size=1, max_size=3),
       dense=st.binary(max_size=5000))
def test_sparse_files_round_trip_through_every_reader(files: list[tuple[list[tuple[int, bytes]], int]],
                                                      dense: bytes) -> None:
    work = Path(tempfile.mkdtemp(prefix="ocitar-sparse-", dir="/var/tmp"))
    try:
        src, dst, gnu = work / "src", work / "dst", work / "gnu"
        for d in (src, dst, gnu):
            d.mkdir()
        for i, (writes, size_blocks) in enumerate(files):
            _sparse_file(src / f"f{i}", writes, size_blocks)
        (src / "dense").write_bytes(dense)
        for directory, _, _ in os.walk(src):
            os.utime(directory, ns=(0, 10**18))
        memory, sizer = io.BytesIO(), TarSizer()
        _written(src, memory)
        _written(src, sizer)
        with open(work / "layer.tar", "wb") as f:
            _written(src, f)
        data = memory.getvalue()
        assert (work / "layer.tar").read_bytes() == data and sizer.count == len(data)
        allocated = sum(os.stat(p).st_blocks * 512 for p in src.iterdir())
        assert len(data) <= allocated + 2048 * (len(files) + 2) + 10240  # headers, maps, padding, end
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                path = src / member.name
                holes = os.stat(path).st_blocks * 512 < os.stat(path).st_size
                assert (member.sparse is not None) == holes, member.name  # dense files stay plain
                extracted = tar.extractfile(member)
                assert extracted is not None and extracted.read() == path.read_bytes()
        apply_tar(dst, io.BytesIO(data))
        subprocess.run(["tar", "-x", "-f", str(work / "layer.tar"), "-C", str(gnu)], check=True)
        os.sync()  # allocations compared after writeback (apply_tar syncs what it writes; delayed
        # allocation counts an extent-index block only once the blocks are allocated)
        for out in (dst, gnu):
            os.utime(out, ns=(0, os.lstat(src).st_mtime_ns))
            assert_same_tree(src, out)
            for p in src.iterdir():  # the holes are holes again: no more blocks than the source
                assert os.stat(out / p.name).st_blocks <= os.stat(p).st_blocks, p.name
    finally:
        shutil.rmtree(work)


def test_applier_refuses_a_sparse_map_outside_the_file(tmp_path: Path) -> None:
    info = tarfile.TarInfo("GNUSparseFile.0/x")
    info.pax_headers.update({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "x",
                             "GNU.sparse.realsize": "100"})
    body = b"1\n4096\n10\n".ljust(512, b"\0") + b"0123456789"
    info.size = len(body)
    stream = io.BytesIO(info.tobuf(tarfile.PAX_FORMAT) + body.ljust(1024, b"\0") + bytes(1024))
    with pytest.raises(InvalidArgument, match="sparse map"):
        apply_tar(tmp_path, stream)
    assert not (tmp_path / "x").exists() or os.stat(tmp_path / "x").st_size == 0


def test_sparse_data_past_the_ustar_size_field_is_written_dense(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """(With the threshold lowered to 8 KiB:) a file with holes but more data than a sparse
    member may carry becomes a plain entry, read back by tarfile and the applier."""
    from csi.graphdriver.diff import ocitar

    monkeypatch.setattr(ocitar, "SPARSE_DATA_MAX", 8192)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _sparse_file(src / "big-data", [(0, os.urandom(9000)), (100, b"tail")], 200)
    _sparse_file(src / "small-data", [(10, b"x")], 200)
    memory = io.BytesIO()
    _written(src, memory)
    with tarfile.open(fileobj=io.BytesIO(memory.getvalue())) as tar:
        kinds = {m.name: m.sparse is not None for m in tar}
    assert kinds == {"big-data": False, "small-data": True}
    apply_tar(dst, io.BytesIO(memory.getvalue()))
    os.utime(dst, ns=(0, os.lstat(src).st_mtime_ns))
    assert_same_tree(src, dst)
