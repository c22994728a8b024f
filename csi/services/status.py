"""The one error seam: :mod:`csi.errors` types -> gRPC status codes.

Contract: handlers of every kind (unary and streaming, on every strata gRPC server) raise
the project's exceptions; the RPC interceptor (:mod:`csi.services.rpclog`) calls
:func:`status_of` for whatever escaped and aborts the call with that code. No handler
builds a status code by hand. Anything that is not a :class:`StrataError` is an
unexpected failure: ``INTERNAL``, with the exception logged by the caller.

Mapping (most specific class first, by walking the exception's MRO):

===================================  ======================  =================================
error                                gRPC code               CSI meaning
===================================  ======================  =================================
OutOfRange                           OUT_OF_RANGE            unsupported capacity
InvalidArgument                      INVALID_ARGUMENT        missing / malformed field
NotFound                             NOT_FOUND               volume / snapshot / source missing
AlreadyExists                        ALREADY_EXISTS          same name, incompatible arguments
Aborted                              ABORTED                 another call holds the name / ID
Busy (HasChildren)                   FAILED_PRECONDITION     in use (mounted / published)
FailedPrecondition                   FAILED_PRECONDITION     e.g. not staged
NoSpace, ResourceExhausted           RESOURCE_EXHAUSTED      out of space, topology, max volumes
ReadOnly                             FAILED_PRECONDITION     write to a frozen layer
Unsupported                          INVALID_ARGUMENT        the driver cannot do what was asked
Unavailable (NoDriverAvailable),     UNAVAILABLE             retry later; no driver can run
DriverUnavailable
Unauthenticated                      UNAUTHENTICATED         missing or wrong token
PermissionDenied                     PERMISSION_DENIED       known caller, not allowed
DigestMismatch                       DATA_LOSS               bytes do not match their digest
Relayed                              its own ``code``        another node's answer, as it is
StrataError (other)                  INTERNAL
NotImplementedError                  UNIMPLEMENTED           an RPC strata does not offer
===================================  ======================  =================================
"""

from __future__ import annotations

import grpc

from csi import errors

CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Busy, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ReadOnly, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unsupported, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DriverUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.DigestMismatch, grpc.StatusCode.DATA_LOSS),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, bool]:
    """``(code, message, expected)`` for an exception; ``expected`` is False for bugs."""
    if isinstance(exc, NotImplementedError):  # a method strata does not offer (generated servicer default)
        return grpc.StatusCode.UNIMPLEMENTED, "method not implemented by strata", True
    if isinstance(exc, errors.Relayed):
        relayed = grpc.StatusCode.__members__.get(exc.code)
        if relayed is None or relayed is grpc.StatusCode.OK:  # a failure is never relayed as success
            relayed = grpc.StatusCode.UNKNOWN
        return relayed, str(exc), True
    if isinstance(exc, errors.StrataError):
        for cls in type(exc).__mro__:
            for known, code in CODES:
                if cls is known:
                    return code, str(exc), True
        return grpc.StatusCode.INTERNAL, str(exc), True
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", False
