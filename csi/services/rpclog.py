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
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi.proto import csi_pb2
from csi.services.status import status_of

log = logging.getLogger("strata.rpc")


def is_secret(field: FieldDescriptor) -> bool:
    """Whether the CSI spec marks ``field`` ``csi_secret``."""
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])


def logged_ids(request: Message) -> dict[str, str]:
    """The identifying fields of a request, secrets excluded."""
    ids: dict[str, str] = {}
    for field, value in request.ListFields():
        if is_secret(field) or field.type != FieldDescriptor.TYPE_STRING or field.is_repeated:
            continue
        if field.name == "name" or field.name.endswith("_id") or field.name.endswith("_path"):
            ids[field.name] = value[:256]
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


class RpcInterceptor(grpc.ServerInterceptor):
    """Wraps every unary-unary handler: timing, one log line, exception -> status."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = details.method

        def wrapped(request: Message, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code, message, expected = grpc.StatusCode.OK, "", True
            if log.isEnabledFor(logging.DEBUG):
                log.debug(json.dumps({"method": method, "request": redacted(request)}, sort_keys=True, default=str))
            try:
                return behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - this is the seam
                code, message, expected = status_of(exc)
                raise_code = code
                if not expected:
                    log.error("unexpected error in %s", method, exc_info=exc)
                context.abort(raise_code, message)
            finally:
                line = {"method": method, "ids": logged_ids(request),
                        "duration_ms": round((time.perf_counter() - start) * 1000, 3), "code": code.name}
                if message:
                    line["message"] = message
                log.info(json.dumps(line, sort_keys=True))

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
