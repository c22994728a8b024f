"""Fixtures of the node-to-node tests; reusable by any test under tests/peers/.

* ``network`` — a :class:`netns.Network`: a hub namespace with a bridge, and
  ``network.add(name)`` for a node namespace with its own 10.213.0.N address (veth to the
  bridge). Everything (processes started with ``host.popen``, namespaces, veths) is removed
  at the end, whatever happened.
* ``kube`` — a :class:`kube_standin.KubeStandIn` (TokenReview, SubjectAccessReview, Nodes,
  other GETs, recorded answers) listening on the hub's address inside ``network``, so strata
  processes in the node namespaces reach it; ``kube.env(path)`` is an environment with a
  KUBECONFIG naming it.
* ``pki`` — a CA and a server certificate for ``peer_pki.PEER_NAME`` (the name every node's
  certificate carries and dialers check), made by the test under ``tmp_path``.

Example (see test_channel.py for complete use)::

    def test_x(network, kube, pki, tmp_path):
        a = network.add("node-a")
        kube.nodes["node-a"] = a.ip
        token = kube.token("strata/strata-node")
        a.popen([sys.executable, "-m", "csi.cli", "serve", ...], env=kube.env(tmp_path / "kc"), log=...)
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube_standin import KubeStandIn  # noqa: E402
from netns import Network, bind_in  # noqa: E402
from peer_pki import Pki, make_pki  # noqa: E402


@pytest.fixture
def network() -> Iterator[Network]:
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("iproute2 (ip) and util-linux (nsenter) are needed for network namespaces")
    net = Network()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def kube(network: Network) -> Iterator[KubeStandIn]:
    api = KubeStandIn.start(bind_in(network.hub, network.hub_ip))
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")
