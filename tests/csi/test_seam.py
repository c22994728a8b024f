"""The one error seam and the services' import structure.

* Every handler kind — unary-unary, unary-stream, stream-unary, stream-stream — answers a
  strata error with its code through :func:`csi.services.listen.new_server`, over a real
  gRPC server on a real unix socket (generic handlers stand in for the coming Diff export).
* ``strata controller`` answers through the same seam (its log line is the interceptor's).
* ``csi/services``, ``csi/state`` and the modules around them have no import circles and
  no function-level imports of strata modules, read from the AST.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peers"))
from peer_pki import make_pki  # noqa: E402

from csi import errors
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc as rpc
from csi.services.forwarder import ControllerConfig, start_controller
from csi.services.listen import listen_unix, new_server
from csi.services.status import status_of

SERVICE = "strata.test.Seam"
REPO = Path(__file__).resolve().parents[2]
# the modules this file checks the structure of (the services side of the package)
OWN = ("csi/services", "csi/state", "csi/kube.py", "csi/cli.py", "csi/demo.py", "csi/errors.py")


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"ok":
        return b"fine"
    if request == b"bug":
        raise KeyError("a bug")
    raise errors.NotFound(f"no {request.decode()}")


def _server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    yield b"second"
    if request != b"ok":
        raise errors.NoDriverAvailable("no layered driver can run here")


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    received = list(requests)
    if received != [b"a", b"b"]:
        raise errors.Aborted(f"got {len(received)} messages")
    return b"both"


def _bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for message in requests:
        if message == b"stop":
            raise errors.OutOfRange("stop is out of range")
        yield message.upper()


@pytest.fixture
def seam(tmp_path: Path) -> Iterator[grpc.Channel]:
    server = new_server(4, "seam-test")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
    })])
    endpoint = listen_unix(server, tmp_path / "seam.sock")
    server.start()
    channel = grpc.insecure_channel(endpoint)
    try:
        yield channel
    finally:
        channel.close()
        server.stop(0).wait()


def _rpc_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "strata.rpc" and r.levelno == logging.INFO]


def test_unary_handlers_answer_through_the_seam(seam: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    call = seam.unary_unary(f"/{SERVICE}/Unary")
    with caplog.at_level(logging.INFO, logger="strata.rpc"):
        assert call(b"ok", timeout=10) == b"fine"
        with pytest.raises(grpc.RpcError) as err:
            call(b"volume", timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no volume"
        with pytest.raises(grpc.RpcError) as err:
            call(b"bug", timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "KeyError" in (err.value.details() or "")
    assert [line["code"] for line in _rpc_lines(caplog)] == ["OK", "NOT_FOUND", "INTERNAL"]
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records), "a bug is logged with its traceback"


def test_a_failing_response_stream_ends_with_the_errors_code(seam: grpc.Channel,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    call = seam.unary_stream(f"/{SERVICE}/ServerStream")
    with caplog.at_level(logging.INFO, logger="strata.rpc"):
        assert list(call(b"ok", timeout=10)) == [b"first", b"second"]
        received = []
        with pytest.raises(grpc.RpcError) as err:
            for message in call(b"fail", timeout=10):
                received.append(message)
    assert received == [b"first", b"second"], "what was sent before the error arrives"
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # NoDriverAvailable is Unavailable
    lines = _rpc_lines(caplog)
    assert [line["code"] for line in lines] == ["OK", "UNAVAILABLE"]
    assert lines[1]["method"] == f"/{SERVICE}/ServerStream" and "no layered driver" in str(lines[1]["message"])


def test_streamed_requests_answer_through_the_seam(seam: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    client = seam.stream_unary(f"/{SERVICE}/ClientStream")
    bidi = seam.stream_stream(f"/{SERVICE}/Bidi")
    with caplog.at_level(logging.INFO, logger="strata.rpc"):
        assert client(iter([b"a", b"b"]), timeout=10) == b"both"
        with pytest.raises(grpc.RpcError) as err:
            client(iter([b"a"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.ABORTED
        replies = bidi(iter([b"x", b"y", b"stop", b"z"]), timeout=10)
        assert next(replies) == b"X" and next(replies) == b"Y"
        with pytest.raises(grpc.RpcError) as err:
            next(replies)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert [line["code"] for line in _rpc_lines(caplog)] == ["OK", "ABORTED", "OUT_OF_RANGE"]


def test_every_error_type_lives_in_errors_and_has_a_code() -> None:
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.StrataError) and cls not in (errors.StrataError,
                                                                                         errors.Relayed):
            assert status_of(cls("x"))[0] is not grpc.StatusCode.INTERNAL, f"{cls.__name__} has no status code"
    error_names = {node.name for node in ast.parse((REPO / "csi/errors.py").read_text()).body
                   if isinstance(node, ast.ClassDef)} | {"Exception", "BaseException"}
    elsewhere = []
    for path in (REPO / "csi").rglob("*.py"):
        if not path.relative_to(REPO).as_posix().startswith(OWN) or path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            bases = {b.id if isinstance(b, ast.Name) else b.attr for b in getattr(node, "bases", ())
                     if isinstance(b, (ast.Name, ast.Attribute))}
            if isinstance(node, ast.ClassDef) and (bases & error_names or any(b.endswith("Error") for b in bases)):
                elsewhere.append(f"{path.relative_to(REPO)}:{node.name}")
    assert elsewhere == [], "exception types belong in csi/errors.py"


def test_strata_controller_answers_through_the_seam(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    pki = make_pki(tmp_path / "pki")
    config = ControllerConfig(endpoint=f"unix://{tmp_path}/c.sock", tls_ca=pki.ca, token_file=token,
                              node_addresses=(("node-a", "127.0.0.1:1"),), timeout=5)
    server, controller = start_controller(config)
    try:
        with grpc.insecure_channel(config.endpoint) as channel, caplog.at_level(logging.INFO, logger="strata.rpc"):
            stub = rpc.ControllerStub(channel)
            request = pb.ControllerExpandVolumeRequest(capacity_range=pb.CapacityRange(required_bytes=1))
            for volume_id, code in (("../etc", grpc.StatusCode.NOT_FOUND),
                                    ("vol-0123456789abcdef0123456789abcdef@node-b", grpc.StatusCode.UNAVAILABLE),
                                    ("vol-0123456789abcdef0123456789abcdef@node-a", grpc.StatusCode.UNAVAILABLE)):
                request.volume_id = volume_id
                with pytest.raises(grpc.RpcError) as err:
                    stub.ControllerExpandVolume(request, timeout=10)
                assert err.value.code() == code, volume_id
    finally:
        server.stop(0).wait()
        controller.close()
    lines = _rpc_lines(caplog)
    assert [line["code"] for line in lines] == ["NOT_FOUND", "UNAVAILABLE", "UNAVAILABLE"]
    assert "node node-b" in str(lines[1]["message"]) and "node node-a" in str(lines[2]["message"])


# ------------------------------------------------------------------ import structure



def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _csi_imports(tree: ast.Module) -> tuple[set[str], list[int]]:
    """The strata modules a file imports at its top level, and the lines of nested imports."""
    top: set[str] = set()
    nested: list[int] = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in names if n == "csi" or n.startswith("csi.")]
        if not names:
            continue
        if node in tree.body or any(node in getattr(parent, "body", ()) for parent in tree.body
                                    if isinstance(parent, ast.If)):  # `if TYPE_CHECKING:` blocks count as top
            top.update(names)
        else:
            nested.append(node.lineno)
    return top, nested


def test_services_and_state_have_no_import_circles_and_no_late_imports() -> None:
    files = [p for p in (REPO / "csi").rglob("*.py")]
    modules = {_module(p): p for p in files}
    graph: dict[str, set[str]] = {}
    late: list[str] = []
    for name, path in modules.items():
        top, nested = _csi_imports(ast.parse(path.read_text(), str(path)))
        graph[name] = {m for m in top if m in modules and m != name}
        if path.relative_to(REPO).as_posix().startswith(OWN):
            late += [f"{name}:{line}" for line in nested]
    assert late == []

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            for nxt in graph.get(current, ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    ours = [m for m, p in modules.items() if p.relative_to(REPO).as_posix().startswith(OWN)]
    circles = [(m, n) for m in ours for n in graph[m] if reaches(n, m)]
    assert circles == []
    assert "csi.services.recovery" not in graph["csi.services.plugin"], "recovery runs from start-up, not the plugin"
    defined = [f"{name}:{node.lineno}" for name, path in modules.items()
               for node in ast.walk(ast.parse(path.read_text(), str(path)))
               if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEFAULT_DRIVER_NAME"
                                                       for t in node.targets)]
    assert len(defined) == 1, f"DEFAULT_DRIVER_NAME is defined once, not at {defined}"
    assert not any(m.startswith("csi.graphdriver") and m not in ("csi.graphdriver.driver", "csi.graphdriver.registry")
                   for m in set().union(*(graph[m] for m in ours))), "services see drivers only through the contract"
