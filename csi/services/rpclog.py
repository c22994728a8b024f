"""Structured RPC logs and the error seam, as one gRPC server interceptor.

Every call produces one JSON log line on the ``strata.rpc`` logger::

    {"method": "/csi.v1.Controller/CreateVolume", "ids": {"name": "pvc-1"},
     "duration_ms": 1.8, "code": "OK"}

``ids`` holds the request's top-level string fields named ``*_id``, ``name`` or
``*_path`` — never a field the proto marks ``csi_secret``, which is read from the
descriptors (:func:`is_secret`), so new secret fields are redacted without code changes.
At debug level the whole request is logged too, through :func:`redacted`.
Escaped exceptions are turned into status codes by :func:`csi.services.status.status_of`;
unexpected ones are logged with their traceback and answered ``INTERNAL``.

Contract: :class:`RpcInterceptor` wraps every handler kind alike — unary-unary,
unary-stream, stream-unary, stream-stream — so every strata gRPC server (``strata serve``,
its forward listener, ``strata controller``; :func:`csi.services.listen.new_server`) has one
error seam. A streaming response that fails part-way ends with the error's code after the
messages already sent; its log line is written when the stream ends. A streamed request has
no ``ids`` (it is not read ahead of the handler).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from csi.proto import csi_pb2
from csi.services.status import status_of

log = logging.getLogger("strata.rpc")


def is_secret(field: FieldDescriptor) -> bool:
    """Whether the CSI spec marks ``field`` ``csi_secret``."""
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])


def _id_fields(descriptor: Descriptor) -> tuple[str, ...]:
    """The names of a message type's identifying fields: top-level, single strings named
    ``name``, ``*_id`` or ``*_path``, never ``csi_secret`` (read once per message type)."""
    fields = _ID_FIELDS.get(descriptor)
    if fields is None:
        fields = _ID_FIELDS[descriptor] = tuple(
            f.name for f in descriptor.fields
            if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated and not is_secret(f)
            and (f.name == "name" or f.name.endswith("_id") or f.name.endswith("_path")))
    return fields


_ID_FIELDS: dict[Descriptor, tuple[str, ...]] = {}


def logged_ids(request: Message) -> dict[str, str]:
    """The identifying fields of a request that are set, secrets excluded."""
    ids: dict[str, str] = {}
    for name in _id_fields(request.DESCRIPTOR):
        value = getattr(request, name)
        if value:
            ids[name] = value[:256]
    return ids


def redacted(message: Message) -> dict[str, Any]:
    """The message as a dict with every ``csi_secret`` field (at any depth) replaced."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if is_secret(field):
            out[field.name] = "<redacted>"
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            out[field.name] = {k: (redacted(v) if isinstance(v, Message) else v) for k, v in value.items()}
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            out[field.name] = [redacted(v) for v in value] if field.is_repeated \
                else redacted(value)
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out


Observer = Callable[[str, str, float], None]  # (method, status code name, seconds)


class _Call:
    """One RPC as the seam sees it: its start, its outcome, its one log line."""

    def __init__(self, method: str, request: object, observer: Observer | None = None) -> None:
        self.method = method
        self.observer = observer
        self.start = time.perf_counter()
        self.code, self.message = grpc.StatusCode.OK, ""
        # a streamed request is an iterator of messages: nothing to name it by up front
        self.ids = logged_ids(request) if isinstance(request, Message) else {}
        if isinstance(request, Message) and log.isEnabledFor(logging.DEBUG):
            log.debug(json.dumps({"method": method, "request": redacted(request)}, sort_keys=True, default=str))

    def abort(self, exc: Exception, context: grpc.ServicerContext) -> NoReturn:
        """Answer ``exc`` with its status code (:func:`status_of`); log a bug's traceback."""
        self.code, self.message, expected = status_of(exc)
        if not expected:
            log.error("unexpected error in %s", self.method, exc_info=exc)
        context.abort(self.code, self.message)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    def close(self) -> None:
        seconds = time.perf_counter() - self.start
        if log.isEnabledFor(logging.INFO):
            line: dict[str, Any] = {"method": self.method, "ids": self.ids, "code": self.code.name,
                                    "duration_ms": round(seconds * 1000, 3)}
            if self.message:
                line["message"] = self.message
            log.info(json.dumps(line, sort_keys=True))
        if self.observer is not None:
            try:
                self.observer(self.method, self.code.name, seconds)
            except Exception:  # noqa: BLE001 - metrics must never fail a call
                log.warning("the RPC observer failed for %s", self.method, exc_info=True)


def _single_response(method: str, behavior: Callable[[Any, grpc.ServicerContext], Any],
                     observer: Observer | None = None) -> Callable[..., Any]:
    """Wrap a handler that returns one response (unary-unary, stream-unary)."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        call = _Call(method, request, observer)
        try:
            return behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - this is the seam
            call.abort(exc, context)
        finally:
            call.close()

    return wrapped


def _streamed_response(method: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                       observer: Observer | None = None) -> Callable[..., Iterator[Any]]:
    """Wrap a handler that yields responses (unary-stream, stream-stream): an error raised
    while the stream is produced ends it with its code; the log line is written at its end."""

    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(method, request, observer)
        try:
            yield from behavior(request, context)
        except Exception as exc:  # noqa: BLE001 - this is the seam
            call.abort(exc, context)
        finally:
            call.close()

    return wrapped


class RpcInterceptor(grpc.ServerInterceptor):
    """Wraps every handler, unary or streaming: timing, one log line, exception -> status;
    ``observer(method, code name, seconds)`` hears of every call (the metrics)."""

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer = observer

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        serializers = {"request_deserializer": handler.request_deserializer,
                       "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _single_response(method, handler.unary_unary, self.observer), **serializers)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _single_response(method, handler.stream_unary, self.observer), **serializers)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streamed_response(method, handler.unary_stream, self.observer), **serializers)
        return grpc.stream_stream_rpc_method_handler(
            _streamed_response(method, handler.stream_stream, self.observer), **serializers)
