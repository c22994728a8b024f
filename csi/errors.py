"""The project's own exception types.

Every layer below the CSI services (store, graphdriver, mount) raises only these,
chained to their cause (``raise NotFound(...) from exc``). Only ``csi.services``
turns them into gRPC status codes, in one place.
"""

from __future__ import annotations


class StrataError(Exception):
    """Base of every error strata raises on purpose."""


class InvalidArgument(StrataError):
    """The caller sent something malformed: fix the request."""


class OutOfRange(InvalidArgument):
    """A value is well-formed but outside what can be honoured (e.g. capacity)."""


class NotFound(StrataError):
    """The named object does not exist (or was not issued by strata)."""


class AlreadyExists(StrataError):
    """An object with this name/ID exists and is incompatible with the request."""


class Busy(StrataError):
    """The object is in use (mounted, or another call holds it)."""


class HasChildren(Busy):
    """A layer cannot be changed because other layers are built on it."""


class Aborted(StrataError):
    """Another operation on the same object is in progress; retry later."""


class FailedPrecondition(StrataError):
    """The object is not in a state that allows the call (e.g. not staged)."""


class NoSpace(StrataError):
    """The backing store or a size limit is exhausted."""


class ResourceExhausted(StrataError):
    """A resource limit (free-space threshold, max volumes, topology) refuses the call."""


class ReadOnly(StrataError):
    """A write was attempted on a frozen (read-only) layer."""


class Unavailable(StrataError):
    """A service strata depends on cannot be reached or used right now (retry later)."""


class NoDriverAvailable(Unavailable):
    """No layered driver can run here; the message lists each driver and why not."""


class DigestMismatch(StrataError):
    """Bytes received do not match the digest they were announced with (corrupt or tampered)."""


class PermissionDenied(StrataError):
    """The caller is known but not allowed to do this."""


class Unauthenticated(StrataError):
    """The caller did not prove who it is (a missing or wrong token)."""


class Relayed(StrataError):
    """Another strata process answered a call with a failure, relayed as it is.

    ``code`` is the name of the gRPC status code it answered (``"NOT_FOUND"``,
    ``"UNAVAILABLE"``, ...), kept as a name so this module needs no gRPC."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DriverUnavailable(StrataError):
    """A graph driver cannot run here; the registry skips it and tries the next one."""


class NotSupported(DriverUnavailable):
    """The kernel or platform lacks what the driver needs."""


class PrerequisitesMissing(DriverUnavailable):
    """A tool, device or configuration the driver needs is missing."""


class IncompatibleFilesystem(DriverUnavailable):
    """The driver cannot work on the filesystem that holds its home."""


class Unsupported(StrataError):
    """The operation is valid but this driver cannot perform it (e.g. no size enforcement)."""
