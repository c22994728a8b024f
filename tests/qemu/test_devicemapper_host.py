"""devicemapper and XFS-quota behaviour that this host's kernel can show: device-mapper
is absent here (/dev/mapper/control gives ENODEV), so the driver must refuse with that
reason and leave nothing behind; option and status parsing are plain functions. The
driver's real work is checked in the qemu lane (tests/qemu/test_guest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi.errors import DriverUnavailable, InvalidArgument, NotSupported, PrerequisitesMissing
from csi.graphdriver.devicemapper import ioctl as dm
from csi.graphdriver import registry
from csi.graphdriver.devicemapper.driver import DevmapperDriver, DmConfig
from csi.host.fsinfo import parse_size
from csi.graphdriver.quota.xfs import ProjectQuota, prjquota_mount


def _dm_works() -> bool:
    try:
        dm.probe()
    except DriverUnavailable:
        return False
    return True


needs_no_dm = pytest.mark.skipif(_dm_works(), reason="this kernel has device-mapper; the qemu lane covers it")


@needs_no_dm
def test_refuses_with_the_reason_and_creates_nothing(ext4_dir: Path) -> None:
    home = ext4_dir / "devicemapper"
    with pytest.raises(NotSupported, match="/dev/mapper/control"):
        DevmapperDriver(home, {"dm.loopback": "true"})
    assert not home.exists()


@needs_no_dm
def test_registry_skips_it_with_the_reason(ext4_dir: Path) -> None:
    with pytest.raises(NotSupported, match="device-mapper unavailable"):
        registry.new_driver(ext4_dir, "devicemapper", {"dm.loopback": "true"})
    assert not (ext4_dir / "devicemapper").exists()


def test_options_are_checked() -> None:
    cfg = DmConfig.from_options({"dm.thinpooldev": "/dev/mapper/p", "dm.basesize": "2G", "dm.fs": "xfs"})
    assert (cfg.pool_device, cfg.base_bytes, cfg.fs, cfg.min_free_percent) == ("/dev/mapper/p", 2 << 30, "xfs", 10)
    with pytest.raises(PrerequisitesMissing, match="dm.thinpooldev"):
        DmConfig.from_options({})  # never builds a pool unasked
    for bad in ({"dm.fs": "btrfs"}, {"dm.min_free_space": "150"}, {"dm.basesize": "-1"}, {"dm.basesize": "ten"},
                {"dm.blocksize": "10K"}, {"dm.bogus": "1"}, {"dm.fs": "xfs", "dm.basesize": "64M"}):
        with pytest.raises(InvalidArgument):
            DmConfig.from_options({"dm.loopback": "true", **bad})


@pytest.mark.parametrize("text,value", [("10G", 10 << 30), ("64M", 64 << 20), ("512", 512), ("1GiB", 1 << 30),
                                        ("4kb", 4096)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text, "x") == value


def test_pool_status_parsing() -> None:
    st = dm.parse_pool_status("7 1655/16384 128/65536 - rw discard_passdown queue_if_no_space - 1024")
    assert (st.transaction_id, st.used_metadata_blocks, st.total_metadata_blocks) == (7, 1655, 16384)
    assert (st.used_data_blocks, st.total_data_blocks, st.free_data_blocks, st.mode) == (128, 65536, 65408, "rw")
    for bad in ("8:0 0", "Fail", "1 2/3", "1 2/3 4/5"):
        with pytest.raises(dm.DmError):
            dm.parse_pool_status(bad)


def test_project_quota_is_none_off_xfs(ext4_dir: Path) -> None:
    assert prjquota_mount(ext4_dir) is None
    assert ProjectQuota.for_home(ext4_dir / "home") is None
    assert not (ext4_dir / "home").exists()
