"""The floor under a CSI call on this machine: what the benchmark's own Python gRPC client
pays for a call that does nothing, and for one that makes a single record durable, served
by a Python gRPC server of the same library on the same kind of unix socket.

The server process (:func:`serve` with SOCKET and DATABASE) serves ``csi.v1.Identity`` (the CSI stubs, so
the messages are as small as a CSI call's), nothing of strata's own code:

* ``Probe`` answers at once: the **RPC floor** — the gRPC stack, the socket, the thread
  hand-offs of a synchronous Python server;
* ``GetPluginInfo`` inserts one row into ``DATABASE``, an sqlite database in WAL mode with
  ``synchronous=FULL`` (sqlite syncs the WAL at each commit: one ``fdatasync``), on the
  filesystem the case's plugin uses: the **durable floor** — the least a call pays that
  acknowledges something only once it survives a power cut.

:func:`measure` runs the server in its own process (as ``strata serve`` is), times both
calls from one client, and times the empty call from ``clients`` threads with a channel
each: the ceiling of calls per second a Python gRPC server reaches here. The lifecycle
figures are read against these, measured in the same run.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi.bench.report import Latency
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as pb_grpc

START_LIMIT_S = 30.0
# the server process's entry (not ``-m``: csi.bench imports this module before runpy would run it)
_SERVE = "import sys; from pathlib import Path; from csi.bench.floor import serve; serve(Path(sys.argv[1]), Path(sys.argv[2]))"


@dataclass(frozen=True)
class Floor:
    """Client-side latencies of the empty and the durable call, and the empty call's rate with
    ``clients`` concurrent clients."""

    rpc: Latency
    durable: Latency
    clients: int
    calls_per_s: float


class _Identity(pb_grpc.IdentityServicer):
    def __init__(self, database: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        return pb.ProbeResponse()

    def GetPluginInfo(self, request: pb.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> pb.GetPluginInfoResponse:
        with self._lock:
            self._db.execute("INSERT INTO calls(name) VALUES (?)", (f"call-{time.monotonic_ns()}",))
        return pb.GetPluginInfoResponse(name="floor")


def serve(socket: Path, database: Path) -> None:
    """Serve until stdin closes (the parent's end of the pipe)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_IdentityServicer_to_server(_Identity(database), server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    sys.stdin.read()
    server.stop(0)


def _wait_ready(stub: pb_grpc.IdentityStub) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while True:
        try:
            stub.Probe(pb.ProbeRequest(), timeout=1)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _latency(call: "grpc.UnaryUnaryMultiCallable", request: object, rounds: int) -> Latency:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        call(request)
        samples.append(time.perf_counter() - start)
    return Latency.of(samples)


def _rate(socket: Path, clients: int, calls_each: int) -> float:
    channels = [grpc.insecure_channel(f"unix://{socket}") for _ in range(clients)]
    stubs = [pb_grpc.IdentityStub(c) for c in channels]
    for stub in stubs:
        stub.Probe(pb.ProbeRequest())
    go = threading.Barrier(clients + 1)

    def client(stub: pb_grpc.IdentityStub) -> None:
        go.wait()
        for _ in range(calls_each):
            stub.Probe(pb.ProbeRequest())

    threads = [threading.Thread(target=client, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in channels:
        c.close()
    return clients * calls_each / elapsed


def measure(workdir: Path, rounds: int, clients: int) -> Floor:
    """The floor on the filesystem of ``workdir``; what it makes there is removed afterwards."""
    socket, database = workdir / "f.sock", workdir / "floor.db"  # a short socket name: sun_path is 108 bytes
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(socket), str(database)],
                            stdin=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    try:
        channel = grpc.insecure_channel(f"unix://{socket}")
        stub = pb_grpc.IdentityStub(channel)
        _wait_ready(stub)
        _latency(stub.Probe, pb.ProbeRequest(), max(10, rounds // 10))  # warm-up
        rpc = _latency(stub.Probe, pb.ProbeRequest(), rounds)
        durable = _latency(stub.GetPluginInfo, pb.GetPluginInfoRequest(), rounds)
        channel.close()
        rate = _rate(socket, clients, max(50, rounds))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for leftover in (socket, database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        if leftover.exists():
            os.unlink(leftover)
    return Floor(rpc, durable, clients, rate)

