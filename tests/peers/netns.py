"""A private test network: one network namespace per strata node, joined by veth pairs.

Layout (made with iproute2, removed by :meth:`Network.close` whatever happened)::

    netns <prefix>-hub   bridge "br0" 10.213.0.254/24  (the Kubernetes API stand-in binds here)
      ├── veth "v-<host>"  <->  netns <prefix>-<host>: "eth0" 10.213.0.N/24, lo up
      └── ...

Addresses live only inside these namespaces (10.213.0.0/24, private), so traffic goes only
between them; the test process stays in its own namespace and reaches the strata processes
through their unix sockets (path sockets are not network-namespaced) and the namespaces
through :func:`bind_in` (a listening socket created inside a namespace).

Usage::

    with Network() as net:                    # or the ``network`` fixture of conftest.py
        a, b = net.add("node-a"), net.add("node-b")
        proc = a.popen([sys.executable, "-m", "csi.cli", "serve", ...], log=path)
        a.ip                                  # "10.213.0.1"
        a.add_address("10.213.0.11")          # a second address (a "moved" node)
        sock = bind_in(net.hub, net.hub_ip)   # a TCP socket listening inside the hub namespace

Processes are started with ``nsenter --net=/run/netns/NAME`` (only the network namespace
changes: mounts are shared with the test, unlike ``ip netns exec``), in their own session so
:func:`stop` can signal the whole group.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SUBNET = "10.213.0"
HUB_IP = f"{SUBNET}.254"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def in_namespace(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that joined netns ``ns``; sockets it makes stay in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[Any] = []

    def run() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {ns}: {os.strerror(err)}")
        finally:
            os.close(fd)
        try:
            result.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result.append((False, exc))

    thread = threading.Thread(target=run)  # the thread ends in the namespace; nothing else uses it
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def bind_in(ns: str, address: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``address:port`` and listening, created inside netns ``ns``."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        return sock

    return in_namespace(ns, make)


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signal ``proc``'s process group (``sig``, then SIGKILL after ``timeout``) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Host:
    """One node's namespace."""

    name: str
    ns: str
    ip: str
    network: "Network"
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def popen(self, argv: Sequence[str], *, log: Path | None = None, env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace (stdout+stderr appended to ``log`` when given)."""
        if log is not None:
            with open(log, "ab") as out:
                proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", "--", *argv], stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True, env=env, **kw)
        else:
            proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", "--", *argv],
                                    start_new_session=True, env=env, **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` to completion inside this namespace (``subprocess.run`` keywords)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", "--", *argv], **kw)

    def add_address(self, ip: str) -> None:
        _ip("-n", self.ns, "addr", "add", f"{ip}/24", "dev", "eth0")

    def del_address(self, ip: str) -> None:
        _ip("-n", self.ns, "addr", "del", f"{ip}/24", "dev", "eth0")

    def link(self, up: bool) -> None:
        """Cut (``False``) or restore this node's cable (the hub side of its veth)."""
        _ip("-n", self.network.hub, "link", "set", self.network.hub_port(self), "up" if up else "down")

    def in_namespace(self, fn: Callable[[], T]) -> T:
        return in_namespace(self.ns, fn)


class Network:
    """Namespaces joined by a bridge (see the module docstring)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"st{secrets.token_hex(3)}"
        self.hub = f"{self.prefix}-hub"
        self.hub_ip = HUB_IP
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def hub_port(self, host: Host) -> str:
        return f"v{list(self.hosts).index(host.name)}"

    def add(self, name: str) -> Host:
        """A new namespace for node ``name`` with the next address (10.213.0.1, .2, …)."""
        if len(self.hosts) >= 200:
            raise RuntimeError("too many hosts")
        ns = f"{self.prefix}-{len(self.hosts)}"
        host = Host(name, ns, f"{SUBNET}.{len(self.hosts) + 1}", self)
        _ip("netns", "add", ns)
        self._made.append(ns)
        self.hosts[name] = host
        port = self.hub_port(host)
        _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.hub, "link", "set", port, "master", "br0")
        _ip("-n", self.hub, "link", "set", port, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return host

    def close(self) -> None:
        """Stop every process started in the namespaces, then delete them (veths go with them)."""
        for host in self.hosts.values():
            for proc in host.procs:
                stop(proc, signal.SIGTERM, timeout=10)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
