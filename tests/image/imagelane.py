"""The image lane's machinery: build the Dockerfile for real with buildah, run it with podman.

The Dockerfile's default base (``python:3.11.x-slim-bookworm``) lives on Docker Hub, which
this lane may not reach. When no ``PYTHON_IMAGE`` is given, :func:`ensure_base` makes a
stand-in locally and caches it: ``debootstrap`` of Debian bookworm (minbase) plus Debian's
python3, python3-pip, python3-venv and python-is-python3, shaped like the python image
where the Dockerfile relies on it (``python`` and ``pip`` on PATH, pip allowed to install
into the system interpreter: Debian's PEP 668 ``EXTERNALLY-MANAGED`` marker is removed, as
the python image has none; ``LANG=C.UTF-8``; apt sources for bookworm, -updates and
-security, as in the Debian images). The base is tagged with a hash of its recipe, so a
changed recipe makes a new one.

Everything lives in one containers/storage root under ``.cache/image/`` (git-ignored), which
both buildah and podman are pointed at, so later runs reuse the base and buildah's layer
cache and nothing touches the machine's own image store:

    .cache/image/storage/       containers/storage (overlay driver): base, layers, image
    .cache/image/strata.oci.tar the built image as an OCI archive (``buildah push oci-archive:``)

Runs use Debian's ``runc`` (crun refuses the hybrid cgroup layout of these machines) with
explicit nofile/nproc ulimits, ``--network none``, and a run root under ``/run``.

Command line (the test lane calls the same functions)::

    .venv/bin/python tests/image/imagelane.py build     # base if needed, image, OCI archive
    .venv/bin/python tests/image/imagelane.py run -- --version
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("STRATA_IMAGE_CACHE", REPO / ".cache" / "image")).resolve()
STORAGE = CACHE / "storage"
RUNROOT = Path("/run/strata-image-lane")
OCI_ARCHIVE = CACHE / "strata.oci.tar"
IMAGE = "localhost/strata:lane"
RUNC = "/usr/sbin/runc"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")
# The apt sources of the Debian images (deb822), so pinned versions resolve as they would on
# the python image (bookworm point releases, -updates and -security).
DEBIAN_SOURCES = f"""\
Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY_MIRROR}
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# What the Debian slim images (and so the python slim images) configure: apt keeps no
# package cache, dpkg skips documentation, manuals and translations.
SLIM_CONFIG = {
    "etc/apt/apt.conf.d/docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'),
    "etc/dpkg/dpkg.cfg.d/docker": (
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/groff/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/lintian/*\n"
        "path-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n"),
}
# What the base must look like from inside; the check runs once after the base is made.
BASE_CHECK = (
    "set -e; python --version; pip --version; test ! -e /usr/lib/python3.11/EXTERNALLY-MANAGED; "
    "python -m venv /tmp/v && /tmp/v/bin/python -c 'import sys; assert sys.prefix != sys.base_prefix'; "
    "rm -rf /tmp/v"
)
# Bump when the recipe below changes in a way the constants above do not show.
RECIPE_VERSION = "1"

# Time caps (seconds). The cold path (debootstrap and a first build) needs the network.
DEBOOTSTRAP_TIMEOUT = 900
BUILD_TIMEOUT = 1200
QUICK_TIMEOUT = 120
RUN_TIMEOUT = 300


class LaneError(RuntimeError):
    """A lane step failed; the message carries the command and the tail of its output."""


@dataclass
class Log:
    """Every command the lane ran, with its duration, for the test report."""

    steps: list[tuple[str, float]] = field(default_factory=list)

    def add(self, what: str, seconds: float) -> None:
        self.steps.append((what, seconds))


LOG = Log()


def missing_tools() -> list[str]:
    """The programs the lane needs that this machine lacks."""
    needed = ("buildah", "podman", "skopeo", "debootstrap", RUNC)
    return [tool for tool in needed if shutil.which(tool) is None]


def sh(argv: Sequence[str], *, timeout: float, check: bool = True, input: str | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a hard time cap; raise :class:`LaneError` with the output tail on failure."""
    start = time.monotonic()
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
        raise LaneError(f"timed out after {timeout}s: {' '.join(argv)}\n{out}") from e
    finally:
        LOG.add(_label(argv), time.monotonic() - start)
    if check and done.returncode != 0:
        raise LaneError(f"exit {done.returncode}: {' '.join(argv)}\n--- stdout\n{done.stdout[-6000:]}"
                        f"\n--- stderr\n{done.stderr[-6000:]}")
    return done


_QUIET_FLAGS = ("--root", "--runroot", "--storage-driver", "--runtime", "--cgroup-manager", "--events-backend")


def _label(argv: Sequence[str]) -> str:
    """The command without the lane's fixed store and runtime flags, for the step log."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in _QUIET_FLAGS:
            skip = True
        else:
            words.append(word)
    return " ".join(words)[:120]


def _store_flags() -> list[str]:
    return ["--root", str(STORAGE), "--runroot", str(RUNROOT), "--storage-driver", "overlay"]


def buildah(*args: str, timeout: float = QUICK_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(["buildah", *_store_flags(), *args], timeout=timeout, check=check)


def podman(*args: str, timeout: float = QUICK_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(["podman", *_store_flags(), "--runtime", RUNC, "--cgroup-manager", "cgroupfs", "--events-backend",
               "file", *args], timeout=timeout, check=check)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One lane at a time per cache (two pytest runs share the storage and the archive)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lane.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def image_exists(ref: str) -> bool:
    return buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, check=False).returncode == 0


def base_tag() -> str:
    recipe = "\n".join([RECIPE_VERSION, SUITE, MIRROR, " ".join(BASE_PACKAGES), DEBIAN_SOURCES, BASE_CHECK,
                        *(f"{k}={v}" for k, v in sorted(SLIM_CONFIG.items()))])
    return f"localhost/strata-base:{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Delete a debootstrap target, never through a mount debootstrap left (proc, sys, dev)."""
    if not path.exists():
        return
    for target in mounts_under(path):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60, check=False)
    if mounts_under(path):
        raise LaneError(f"mounts remain under {path}: {mounts_under(path)}")
    shutil.rmtree(path)


def ensure_base() -> str:
    """The stand-in for the python base image, made (and cached) when missing. Returns its tag."""
    tag = base_tag()
    if image_exists(tag):
        return tag
    rootfs = CACHE / "base-rootfs"
    _remove_tree(rootfs)
    try:
        sh(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), MIRROR],
           timeout=DEBOOTSTRAP_TIMEOUT)
        for target in mounts_under(rootfs):
            sh(["umount", "-l", target], timeout=60)
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink()
        for name, text in SLIM_CONFIG.items():
            (rootfs / name).write_text(text)
        for name in ("etc/hostname", "etc/resolv.conf"):  # the container engine provides these
            (rootfs / name).unlink(missing_ok=True)
        for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
            for entry in rootfs.glob(pattern):
                entry.unlink()
        ctr = buildah("from", "scratch").stdout.strip()
        try:
            mnt = buildah("mount", ctr).stdout.strip()
            sh(["cp", "-a", f"{rootfs}/.", mnt], timeout=QUICK_TIMEOUT)
            buildah("umount", ctr)
            buildah("config", "--env", "LANG=C.UTF-8",
                    "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--cmd", "python3", "--os", "linux", "--arch", "amd64",
                    "--label", "org.opencontainers.image.description=strata image lane: Debian bookworm + python3 "
                    "(stand-in for python:3.11-slim-bookworm)", ctr)
            buildah("run", "--isolation", "chroot", ctr, "--", "sh", "-c", BASE_CHECK, timeout=RUN_TIMEOUT)
            buildah("commit", "--rm", ctr, tag, timeout=BUILD_TIMEOUT)
        except BaseException:
            buildah("rm", ctr, check=False)
            raise
    finally:
        _remove_tree(rootfs)
    return tag


def drop_old_bases(tag: str) -> None:
    """Untag bases of older recipes (their layers go with the next prune)."""
    for ref in buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split():
        if ref.startswith(tag.rpartition(":")[0] + ":") and ref != tag:
            buildah("rmi", ref, check=False)


def ca_volume() -> list[str]:
    """The host's CA bundle over the build's, for RUN steps only (not part of any layer).

    Machines whose egress to PyPI passes through a TLS-intercepting proxy trust its CA in the
    host bundle; pip inside the build needs the same trust. Where the host has no bundle, or
    the lane runs without interception, this changes nothing the image keeps.
    """
    bundle = Path(HOST_CA_BUNDLE)
    return ["--volume", f"{bundle}:{bundle}:ro"] if bundle.is_file() else []


def build(python_image: str | None = None) -> str:
    """Build the Dockerfile into :data:`IMAGE` (layer cache on) and export :data:`OCI_ARCHIVE`.

    ``python_image`` overrides the base (e.g. a mirror of the real python image); by default
    the lane's own base from :func:`ensure_base`. Returns the image ID.
    """
    with locked():
        # Working containers of an interrupted build (the lock says no lane build is running).
        buildah("rm", "--all", check=False)
        base = python_image or os.environ.get("STRATA_PYTHON_IMAGE") or ensure_base()
        buildah("bud", "--layers", "--force-rm", "--pull=never" if base.startswith("localhost/") else "--pull=true",
                "--isolation", "chroot", "--build-arg", f"PYTHON_IMAGE={base}", *ca_volume(),
                "--file", str(REPO / "Dockerfile"), "--tag", IMAGE, str(REPO), timeout=BUILD_TIMEOUT)
        image_id = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", IMAGE).stdout.strip()
        tmp = OCI_ARCHIVE.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        buildah("push", "--quiet", IMAGE, f"oci-archive:{tmp}:{IMAGE.rpartition('/')[2]}", timeout=BUILD_TIMEOUT)
        tmp.rename(OCI_ARCHIVE)
        # Old bases and dangling layers of earlier builds would grow the cache without bound.
        if base.startswith("localhost/strata-base:"):
            drop_old_bases(base)
        buildah("rmi", "--prune", check=False, timeout=BUILD_TIMEOUT)
        return image_id


def run(*args: str, privileged: bool = False, volumes: Sequence[str] = (), entrypoint: str | None = None,
        timeout: float = RUN_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``podman run --rm`` of :data:`IMAGE` with the lane's runtime settings."""
    flags = ["--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    if privileged:
        flags.append("--privileged")
    for volume in volumes:
        flags += ["--volume", volume]
    if entrypoint is not None:
        flags += ["--entrypoint", entrypoint]
    return podman("run", *flags, IMAGE, *args, timeout=timeout, check=check)


def skopeo_inspect(archive: Path = OCI_ARCHIVE, *, raw: bool = False) -> str:
    return sh(["skopeo", "inspect", *(["--raw"] if raw else []), f"oci-archive:{archive}"],
              timeout=QUICK_TIMEOUT).stdout


def main(argv: list[str]) -> int:
    if missing_tools():
        print(f"missing: {' '.join(missing_tools())}", file=sys.stderr)
        return 2
    if argv[:1] == ["build"]:
        print(build())
    elif argv[:1] == ["run"]:
        done = run(*[a for a in argv[1:] if a != "--"], privileged=True, check=False)
        print(done.stdout + done.stderr, end="")
        return done.returncode
    else:
        print(__doc__)
        return 2
    for what, seconds in LOG.steps:
        print(f"{seconds:8.1f}s  {what}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
