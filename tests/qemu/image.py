"""Build what the qemu kernel lane boots: a stock Debian kernel and a small initramfs.

Nothing is installed on the host. The kernel package named by Debian 12's
``linux-image-amd64`` meta package is fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``; the uncompressed ``vmlinux`` is cut out of the ``vmlinuz`` (an xz stream
inside the bzImage; the kernel has ``CONFIG_PVH`` so qemu boots the ELF directly, faster
than the bzImage); the modules the lane needs are resolved with
``modprobe -d <root> -S <version> --show-depends`` and packed, with the static busybox
and :file:`init.sh`, into a gzip'd newc cpio.

Cache layout (``.cache/qemu`` under the repository, gitignored; ``STRATA_QEMU_CACHE``
overrides)::

    <cache>/<version>/linux-image-<version>_<debver>_amd64.deb
    <cache>/<version>/root/            the unpacked package (boot/, lib/modules/)
    <cache>/<version>/vmlinux          extracted ELF kernel
    <cache>/<version>/initrd-<hash>.gz initramfs; <hash> covers init.sh, busybox and modules

Every step writes to a temporary name and renames, so an interrupted build is redone,
never half-used. ``python -m tests.qemu.image`` prepares the cache and prints the paths.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX = Path("/bin/busybox")
META_PACKAGE = "linux-image-amd64"

#: modules the guest loads, in dependency order after resolution
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_blk", "9pnet_virtio", "9p",  # host tree and scratch disk
    "dm-thin-pool", "loop", "ext4", "xfs", "overlay", "quota_v2",
    "btrfs",  # the power-cut lane's btrfs root (tests/qemu/powercut.py)
)


class ImageError(RuntimeError):
    """The kernel or initramfs could not be prepared; the message says which step."""


@dataclass(frozen=True)
class BootImage:
    version: str
    vmlinux: Path
    initrd: Path


def cache_dir() -> Path:
    return Path(os.environ.get("STRATA_QEMU_CACHE", REPO / ".cache" / "qemu"))


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


def kernel_package() -> str:
    """The versioned package the meta package depends on, e.g. ``linux-image-6.1.0-56-amd64``."""
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            dep = line.strip()
            if dep.startswith("Depends: linux-image-") and dep.endswith("-amd64"):
                return dep.split(":", 1)[1].strip()
        if attempt == 0:  # a fresh machine may have no package lists yet
            _run(["apt-get", "update", "-qq"])
    raise ImageError(f"apt-cache knows no kernel behind {META_PACKAGE} (run apt-get update)")


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    if final.exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fetch_kernel(package: str | None = None) -> tuple[str, Path]:
    """Download and unpack the kernel package (cached). Returns (version, unpacked root)."""
    package = package or kernel_package()
    version = package.removeprefix("linux-image-")
    vdir = cache_dir() / version
    vdir.mkdir(parents=True, exist_ok=True)
    debs = sorted(vdir.glob(f"{package}_*.deb"))
    if not debs:
        tmp = Path(tempfile.mkdtemp(prefix="download.", dir=vdir))
        try:
            os.chmod(tmp, 0o755)
            _run(["apt-get", "download", "-q", package], cwd=tmp)
            for deb in tmp.glob("*.deb"):
                deb.rename(vdir / deb.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        debs = sorted(vdir.glob(f"{package}_*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {package} produced no package")

    def unpack(tmp: Path) -> None:
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)])
        _run(["depmod", "-b", str(tmp), version])

    return version, _atomic_dir(vdir / "root", unpack)


def extract_vmlinux(vmlinuz: Path, dest: Path) -> Path:
    """Cut the xz-compressed ELF out of a bzImage (what scripts/extract-vmlinux does)."""
    if dest.exists():
        return dest
    blob = vmlinuz.read_bytes()
    start = blob.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(blob[start:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            tmp = dest.with_suffix(".tmp")
            tmp.write_bytes(elf)
            tmp.rename(dest)
            return dest
        start = blob.find(b"\xfd7zXZ\x00", start + 1)
    raise ImageError(f"no xz-compressed ELF kernel inside {vmlinuz}")


def resolve_modules(root: Path, version: str) -> list[Path]:
    """Module files to load, dependencies first, each once."""
    out = _run(["modprobe", "-d", str(root), "-S", version, "--show-depends", "-a", *GUEST_MODULES])
    seen: list[Path] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod":
            path = Path(parts[1])
            if path not in seen:
                seen.append(path)
    if not seen:
        raise ImageError("modprobe resolved no modules")
    return seen


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (directories have empty data)."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nameb = name.encode() + b"\x00"
        header = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        )
        out.write(header.encode() + nameb)
        out.write(b"\x00" * (-(110 + len(nameb)) % 4))
        out.write(data)
        out.write(b"\x00" * (-len(data) % 4))
    return out.getvalue()


def build_initrd(root: Path, version: str, dest_dir: Path) -> Path:
    modules = resolve_modules(root, version)
    init = INIT_SCRIPT.read_bytes()
    busybox = BUSYBOX.read_bytes()
    digest = hashlib.sha256(init + busybox)
    for m in modules:
        digest.update(str(m.relative_to(root)).encode())
    dest = dest_dir / f"initrd-{digest.hexdigest()[:16]}.gz"
    if dest.exists():
        return dest
    dirs = ["bin", "dev", "proc", "sys", "host", "mnt", "modules"]
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in dirs]
    entries.append(("bin/busybox", 0o100755, busybox))
    entries.append(("init", 0o100755, init))
    order = []
    for i, m in enumerate(modules):
        name = f"modules/{i:03d}-{m.name}"
        entries.append((name, 0o100644, m.read_bytes()))
        order.append(name)
    entries.append(("modules/order", 0o100644, ("\n".join(order) + "\n").encode()))
    tmp = dest.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(gzip.compress(_cpio_newc(entries), compresslevel=1))
    tmp.rename(dest)
    return dest


def prepare() -> BootImage:
    """Everything needed to boot, built or taken from the cache."""
    for tool in ("apt-get", "dpkg-deb", "modprobe", "depmod"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} not found (run .ci/setup)")
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} missing: install busybox-static (run .ci/setup)")
    version, root = fetch_kernel()
    vdir = root.parent
    vmlinux = extract_vmlinux(root / "boot" / f"vmlinuz-{version}", vdir / "vmlinux")
    return BootImage(version=version, vmlinux=vmlinux, initrd=build_initrd(root, version, vdir))


if __name__ == "__main__":
    image = prepare()
    print(f"kernel {image.version}\nvmlinux {image.vmlinux}\ninitrd {image.initrd}")
    sys.exit(0)
