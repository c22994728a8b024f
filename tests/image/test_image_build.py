"""The image lane: the Dockerfile built for real with buildah and run with podman.

The base the Dockerfile names (python:3.11.x-slim-bookworm, Docker Hub) cannot be pulled
here, so the lane makes a stand-in from Debian bookworm with debootstrap and caches it under
.cache/image/ (see imagelane.py); everything else is the real thing: buildah builds the
Dockerfile as written, with its pinned Debian packages from today's bookworm mirrors and its
Python dependencies from PyPI; podman (with Debian's runc) runs the image; skopeo reads the
OCI archive the lane exports for pushing to a registry.

Cold (no cache): about 3 minutes, most of it debootstrap and the first build. Warm: the
base and the apt layer are reused, and a change under csi/ rebuilds the wheel and the pip
layer only (well under a minute). Every command has a time cap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagelane as lane

pytestmark = [
    pytest.mark.timeout(1800),  # a cold cache: debootstrap + the first build
    pytest.mark.skipif(os.geteuid() != 0, reason="the image lane builds and runs containers as root"),
    pytest.mark.skipif(bool(lane.missing_tools()), reason=f"image lane tools missing: {lane.missing_tools()}"),
]

PROJECT = tomllib.loads((lane.REPO / "pyproject.toml").read_text())["project"]


def _dockerfile_checks():  # type: ignore[no-untyped-def]
    """tests/deploy/test_dockerfile.py: its Dockerfile parser and the drivers' tool table."""
    spec = importlib.util.spec_from_file_location("_dockerfile_checks", lane.REPO / "tests/deploy/test_dockerfile.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DF = _dockerfile_checks()


@pytest.fixture(scope="module")
def image() -> str:
    """Build (or reuse) the image and its OCI archive once for the module; returns the image ID."""
    start = len(lane.LOG.steps)
    image_id = lane.build()
    for what, seconds in lane.LOG.steps[start:]:
        print(f"{seconds:7.1f}s  {what}")
    return image_id


def test_pinned_packages_are_what_the_image_holds(image: str) -> None:
    """The build installed every pinned Debian package at exactly its pinned version."""
    pins = DF.apt_packages(DF.stages(DF.instructions(DF.DOCKERFILE.read_text()))["runtime"])
    assert pins
    done = lane.run("-W", "-f", "${Package}=${Version}\\n", *pins, entrypoint="dpkg-query")
    installed = dict(line.split("=", 1) for line in done.stdout.split())
    assert installed == pins


def test_the_tools_the_drivers_call_are_on_path(image: str) -> None:
    tools = sorted({tool for table in DF.DRIVER_TOOLS.values() for tool in table})
    done = lane.run("-c", 'for t in "$@"; do command -v "$t" || echo "MISSING $t"; done', "sh", *tools,
                    entrypoint="sh")
    assert "MISSING" not in done.stdout, done.stdout
    assert len(done.stdout.split()) == len(tools)


def test_strata_version(image: str) -> None:
    want = f"strata {PROJECT['version']}"
    assert lane.run("--version", entrypoint="strata").stdout.strip() == want
    # The ENTRYPOINT is `strata serve` (what the chart's node plugin runs): its --version too.
    assert lane.run("--version").stdout.strip() == want


def test_strata_doctor(image: str, tmp_path: Path) -> None:
    """`strata doctor` in a privileged container, its root on a host directory as in the chart."""
    usage = lane.run("--help", entrypoint="strata").stdout
    if not re.search(r"^\s+doctor\s", usage, re.MULTILINE):
        pytest.skip("`strata doctor` is not a command of this build (strata --help lists none)")
    done = lane.run("doctor", "--root", "/var/lib/strata", privileged=True, entrypoint="strata",
                    volumes=[f"{tmp_path}:/var/lib/strata"], check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vfs" in done.stdout  # the driver every kernel offers is among those it reports


def test_strata_demo_in_a_privileged_container(image: str, tmp_path: Path) -> None:
    """`strata demo` end to end, its root on a host directory as the chart's hostPath gives it."""
    host = tmp_path / "strata"
    host.mkdir()
    done = lane.run("demo", "--root", "/var/lib/strata/demo", privileged=True, entrypoint="strata",
                    volumes=[f"{host}:/var/lib/strata"], check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "strata demo: all checks passed" in done.stdout
    assert "check: no layer left behind: ok" in done.stdout
    assert lane.mounts_under(host) == []  # nothing the container mounted leaks to the host


def test_entrypoint_serves_csi_on_the_socket_and_drains_on_sigterm(image: str, tmp_path: Path) -> None:
    """The image's ENTRYPOINT with the chart's flags: a host gRPC client reaches the plugin
    through the bind-mounted socket directory (as kubelet does), then SIGTERM exits 0."""
    import grpc

    from csi.proto import csi_pb2 as pb
    from csi.proto import csi_pb2_grpc as rpc

    sockets, root = tmp_path / "csi", tmp_path / "root"
    sockets.mkdir()
    root.mkdir()
    name = f"strata-lane-{uuid.uuid4().hex[:8]}"
    lane.podman("run", "--detach", "--name", name, "--network", "none", "--privileged", "--ulimit", "nofile=1024:1024",
                "--ulimit", "nproc=1024:1024", "--volume", f"{sockets}:/csi", "--volume", f"{root}:/var/lib/strata",
                lane.IMAGE, "--endpoint=unix:///csi/csi.sock", "--node-id=lane-node", "--root=/var/lib/strata",
                "--driver=auto", "--driver-name=strata.csi.dev", "--grace=10")
    try:
        socket = sockets / "csi.sock"
        deadline = time.monotonic() + 60
        while not socket.exists():
            assert time.monotonic() < deadline, lane.podman("logs", name, check=False).stderr
            time.sleep(0.2)
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            identity, node = rpc.IdentityStub(channel), rpc.NodeStub(channel)
            info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
            assert (info.name, info.vendor_version) == ("strata.csi.dev", PROJECT["version"])
            assert identity.Probe(pb.ProbeRequest(), timeout=30).ready.value is True
            topology = node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30)
            assert topology.node_id == "lane-node"
            assert "strata.csi.dev/layered-driver" in topology.accessible_topology.segments
        lane.podman("stop", "--time", "30", name, timeout=60)
        state = json.loads(lane.podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, lane.podman("logs", name, check=False).stderr
    finally:
        lane.podman("rm", "--force", name, check=False)


def test_oci_archive_is_the_image(image: str) -> None:
    """The exported archive (what `skopeo copy` pushes) carries the built image's config."""
    assert lane.OCI_ARCHIVE.is_file()
    manifest = json.loads(lane.skopeo_inspect(raw=True))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["digest"] == f"sha256:{image}"  # the very image buildah built
    config = json.loads(lane.sh(["skopeo", "inspect", "--config", f"oci-archive:{lane.OCI_ARCHIVE}"],
                                timeout=lane.QUICK_TIMEOUT).stdout)
    assert config["config"]["Entrypoint"] == ["strata", "serve"]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    assert config["config"]["Labels"]["org.opencontainers.image.title"] == "strata"
    assert len(manifest["layers"]) == len(config["rootfs"]["diff_ids"])
    inspected = json.loads(lane.skopeo_inspect())
    assert "PYTHONUNBUFFERED=1" in inspected["Env"]


def test_a_stale_pin_fails_the_build(image: str, tmp_path: Path) -> None:
    """The build is a real check of the pins: a version bookworm does not have stops it."""
    (tmp_path / "Dockerfile").write_text(
        "ARG PYTHON_IMAGE\nFROM ${PYTHON_IMAGE}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends util-linux=2.38.1-0stale\n")
    # apt's own words (the step's command line, echoed in the output, would match a looser pattern).
    with pytest.raises(lane.LaneError, match=r"Version '2\.38\.1-0stale' for 'util-linux' was not found"):
        lane.buildah("bud", "--no-cache", "--force-rm", "--pull=never", "--isolation", "chroot",
                     "--build-arg", f"PYTHON_IMAGE={lane.base_tag()}", *lane.ca_volume(), "--file", str(tmp_path / "Dockerfile"), str(tmp_path),
                     timeout=lane.RUN_TIMEOUT)


@pytest.fixture(autouse=True)
def _report_steps() -> Iterator[None]:
    """Print the lane's commands and durations under -rA / on failure (the time budget)."""
    start = len(lane.LOG.steps)
    yield
    for what, seconds in lane.LOG.steps[start:]:
        print(f"{seconds:7.1f}s  {what}")
