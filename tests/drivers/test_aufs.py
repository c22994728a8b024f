"""The aufs driver. This kernel has no aufs, so:

* ``TestAufs`` (the shared conformance suite) skips, saying so, wherever the kernel lacks
  aufs, and runs on kernels that carry it;
* the mount description is unit-tested without mounting, on a real layer home, through
  ``_DescribeOnlyAufs`` — a fake only in its support check (which would refuse this
  kernel); nothing in these tests mounts aufs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conformance import DriverConformance, open_driver  # noqa: E402

from csi.errors import NotSupported, OutOfRange  # noqa: E402
from csi.graphdriver.overlay.aufs import MAX_BRANCHES, AufsDriver  # noqa: E402
from csi.graphdriver.overlay.layout import AUFS_WHITEOUTS  # noqa: E402
from csi.graphdriver.overlay.driver import kernel_has  # noqa: E402


class TestAufs(DriverConformance):
    max_depth = MAX_BRANCHES

    @pytest.fixture
    def driver(self, ext4_dir: Path) -> Iterator[AufsDriver]:
        try:
            with open_driver(AufsDriver, ext4_dir / "aufs") as drv:
                yield drv  # type: ignore[misc]
        except NotSupported as exc:
            pytest.skip(f"kernel lacks aufs: {exc}")


class _DescribeOnlyAufs(AufsDriver):
    """AufsDriver with the kernel check bypassed, to build mount descriptions here."""

    @classmethod
    def check_support(cls, home: Path, options: Mapping[str, str]) -> None:
        return None


@pytest.fixture
def aufs(ext4_dir: Path) -> Iterator[AufsDriver]:
    drv = _DescribeOnlyAufs(ext4_dir / "aufs")
    try:
        yield drv
    finally:
        drv.store.close()


def test_support_check_names_the_missing_filesystem(ext4_dir: Path) -> None:
    if kernel_has("aufs"):
        pytest.skip("this kernel has aufs")
    with pytest.raises(NotSupported, match=r"aufs not in /proc/filesystems"):
        AufsDriver(ext4_dir / "aufs")
    assert not (ext4_dir / "aufs").exists()


def _chain(drv: AufsDriver, depth: int) -> str:
    """A writable layer on top of ``depth - 1`` frozen layers; returns its id."""
    drv.create("w0")
    for i in range(depth - 1):
        drv.freeze("w0", f"f{i}")  # unmounted freeze: w0 is rebased onto each new layer
    return "w0"


def test_writable_branches_upper_first(aufs: AufsDriver) -> None:
    top = _chain(aufs, 3)
    lay = aufs.layout
    desc = aufs.describe_mount(aufs.layer(top), aufs.chain(top))
    assert (desc.fstype, desc.source, desc.cwd) == ("aufs", "none", str(lay.links))
    br = desc.options[0]
    assert br == f"br:{lay.diff(top)}=rw:{lay.short('f1')}=ro+wh:{lay.short('f0')}=ro+wh"
    assert "dio" in desc.options and "xino=/dev/shm/aufs.xino" in desc.options
    assert "ro" not in desc.options
    for short in (lay.short("f0"), lay.short("f1")):
        assert (lay.links / short).is_symlink()


def test_frozen_view_is_read_only(aufs: AufsDriver) -> None:
    _chain(aufs, 3)
    lay = aufs.layout
    desc = aufs.describe_mount(aufs.layer("f1"), aufs.chain("f1"))
    assert desc.options[0] == "ro"
    assert desc.options[1] == f"br:{lay.short('f1')}=ro+wh:{lay.short('f0')}=ro+wh"
    single = aufs.describe_mount(aufs.layer("f0"), aufs.chain("f0"))
    assert single.options == ("bind", "ro") and single.source == str(lay.diff("f0"))


def test_layer_without_parent_has_one_branch(aufs: AufsDriver) -> None:
    aufs.create("root")
    desc = aufs.describe_mount(aufs.layer("root"), aufs.chain("root"))
    assert desc.options[0] == f"br:{aufs.layout.diff('root')}=rw"


def test_longest_chain_fits_one_page_and_deeper_is_refused(aufs: AufsDriver) -> None:
    top = _chain(aufs, MAX_BRANCHES)
    desc = aufs.describe_mount(aufs.layer(top), aufs.chain(top))
    assert desc.options[0].count("=ro+wh") == MAX_BRANCHES - 1
    _, data = desc.flags_and_data()
    assert len(data.encode()) < 4096, "a classic mount(2) data string must fit one page"
    aufs.freeze(top, "deepest")  # a rebase would exceed the limit: the freeze copies
    assert aufs.layer(top).parent == f"f{MAX_BRANCHES - 2}"
    assert len(aufs.chain("deepest")) == MAX_BRANCHES
    with pytest.raises(OutOfRange, match=str(MAX_BRANCHES)):
        aufs.create("too-deep", "deepest")
    assert not aufs.exists("too-deep") and "too-deep" not in aufs._on_disk()


def test_whiteouts_are_native_oci_names(aufs: AufsDriver, tmp_path: Path) -> None:
    import io
    import tarfile

    aufs.create("w")
    diff = aufs.layout.diff("w")
    (diff / "kept").write_text("kept")
    (diff / ".wh.gone").write_text("")
    (diff / "dir").mkdir()
    (diff / "dir" / ".wh..wh..opq").write_text("")
    (diff / ".wh..wh.plnk").mkdir()  # aufs bookkeeping
    with tarfile.open(fileobj=aufs.diff("w"), mode="r|") as tar:
        names = [m.name.rstrip("/") for m in tar]
    assert ".wh.gone" in names and "dir/.wh..wh..opq" in names and "kept" in names
    assert not any(".wh..wh.plnk" in n for n in names)
    assert AUFS_WHITEOUTS.whiteout_target("", ".wh.gone", (diff / ".wh.gone").stat()) == "gone"
    buf = io.BytesIO()
    aufs.create("y")
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("d", "d/.wh..wh..opq"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if name == "d" else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    aufs.apply_diff("y", None, buf)
    assert (aufs.layout.diff("y") / "d" / ".wh..wh..opq").is_file()
