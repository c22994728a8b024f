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
