"""The lane's image builder on the host: the cpio writer against GNU cpio, and the
module resolution against the real unpacked Debian kernel (downloaded once, cached)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from . import image


def test_cpio_archive_reads_back_with_gnu_cpio(tmp_path: Path) -> None:
    data = image._cpio_newc([("bin", 0o040755, b""), ("bin/tool", 0o100755, b"#!/bin/sh\necho hi\n"),
                             ("odd-len", 0o100644, b"abc")])
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True).stdout
    assert listing.decode().split() == ["bin", "bin/tool", "odd-len"]
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd-len").read_bytes() == b"abc"


def test_boot_image_has_kernel_and_the_lane_modules() -> None:
    try:
        boot = image.prepare()
    except image.ImageError as exc:
        pytest.fail(f"cannot prepare the lane's kernel: {exc}")
    assert boot.vmlinux.read_bytes()[:4] == b"\x7fELF"
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=subprocess.run(
        ["gzip", "-dc", str(boot.initrd)], capture_output=True, check=True).stdout, capture_output=True,
        check=True).stdout.decode().split()
    assert "init" in listing and "bin/busybox" in listing
    for module in ("dm-thin-pool.ko", "xfs.ko", "9p.ko", "virtio_blk.ko", "overlay.ko", "loop.ko"):
        assert any(name.endswith("-" + module) for name in listing), module
