"""Who is calling: Kubernetes ServiceAccount tokens on strata's TCP listeners.

Contract:

* A caller sends gRPC metadata ``authorization: Bearer <token>`` (a ServiceAccount token,
  ideally a projected one with strata's audience). :class:`TokenReviewer` validates it with a
  ``TokenReview`` (``authentication.k8s.io/v1``) through the official ``kubernetes`` client,
  asking for the configured audiences; the answer must be ``authenticated`` and, when
  audiences were asked for, name one of them. The result is a :class:`Caller`. Answers are
  cached for ``cache_seconds`` under the token's sha256 (never the token itself).
* :class:`TokenAuthInterceptor` is a server interceptor for every handler kind: no or a
  malformed ``authorization`` -> :class:`~csi.errors.Unauthenticated`; a token the API
  rejects -> Unauthenticated; then ``authorize(caller, method)`` (an optional callback, e.g.
  :func:`allow_service_accounts`, or :func:`by_method` for a listener with several services)
  may raise :class:`~csi.errors.PermissionDenied`. The
  handler receives a context whose :func:`caller_of` is the Caller, for per-request
  decisions (:class:`AccessReviewer`). Refusals are raised *inside* the wrapped handler, so
  the server's error seam (:class:`csi.services.rpclog.RpcInterceptor`, outermost) maps and
  logs them like every error; the token appears in no message and no log line.
* :class:`AccessReviewer` asks a ``SubjectAccessReview`` (``authorization.k8s.io/v1``)
  whether the caller (user, uid, groups, extra as the TokenReview gave them) may ``verb``
  a resource; :meth:`AccessReviewer.require` raises PermissionDenied when not.
* An API server that cannot be reached or refuses strata's own requests is
  :class:`~csi.errors.Unavailable` (the caller may retry), never a grant.

Both the Diff export service's TCP listener and the node-to-node channel (issue 12) use this
module; :mod:`csi.peers.tls` provides the transport.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from csi.errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger("strata.peers.auth")

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
MAX_TOKEN_BYTES = 16 << 10


@dataclass(frozen=True)
class Caller:
    """An authenticated caller, as the TokenReview described it."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def service_account(self) -> tuple[str, str] | None:
        """``(namespace, name)`` for a ServiceAccount, else None."""
        if not self.username.startswith(SERVICE_ACCOUNT_PREFIX):
            return None
        namespace, sep, name = self.username[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
        return (namespace, name) if sep and namespace and name else None


# what the channel's calls use from the kubernetes client, whose modules load on first use
# (about a second of CPU: it would otherwise land on the first restore from another node)
_CLIENT_NAMES = ("ApiClient", "Configuration", "CoreV1Api", "CustomObjectsApi", "AuthenticationV1Api",
                 "V1TokenReview", "V1TokenReviewSpec", "AuthorizationV1Api", "V1SubjectAccessReview",
                 "V1SubjectAccessReviewSpec", "V1ResourceAttributes")


def preload_client() -> threading.Thread:
    """Load the kubernetes client modules the channel uses, in a background thread (started
    and returned), so the first call through the channel does not pay for the imports."""

    def load() -> None:
        try:
            from kubernetes import client, config  # noqa: F401
            from kubernetes.client.exceptions import ApiException  # noqa: F401

            for name in _CLIENT_NAMES:
                getattr(client, name)
        except Exception:  # noqa: BLE001 - the first real call reports what is wrong
            log.debug("could not preload the kubernetes client", exc_info=True)

    thread = threading.Thread(target=load, name="kube-preload", daemon=True)
    thread.start()
    return thread


def _api_errors() -> tuple[type[BaseException], ...]:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    # ValueError/TypeError: an answer the client cannot deserialise (its models validate fields)
    return ApiException, HTTPError, OSError, ValueError, TypeError


class TokenReviewer:
    """Validates bearer tokens with TokenReview (see the module docstring)."""

    def __init__(self, api_client: Callable[[], Any] | Any, audiences: Iterable[str] = (),
                 cache_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._api_client = api_client
        self.audiences = tuple(a for a in audiences if a)
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def _client(self) -> Any:
        return self._api_client() if callable(self._api_client) else self._api_client

    def review(self, token: str) -> Caller:
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("bearer token is empty or too long")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        caller = self._ask(token)
        with self._lock:
            if len(self._cache) > 1024:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            self._cache[key] = (now + self.cache_seconds, caller)
        return caller

    def _ask(self, token: str) -> Caller:
        from kubernetes import client

        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=list(self.audiences) or None))
        try:
            answer = client.AuthenticationV1Api(self._client()).create_token_review(body, _request_timeout=15)
        except _api_errors() as exc:
            status = getattr(exc, "status", None)
            raise Unavailable(f"TokenReview failed: API server {'answered ' + str(status) if status else 'unreachable'}"
                              f" ({type(exc).__name__})") from None  # the cause may quote the token
        status = answer.status
        if status is None or not status.authenticated or status.user is None or not status.user.username:
            reason = (status.error if status is not None and status.error else "token not authenticated")
            raise Unauthenticated(f"bearer token rejected: {reason[:200]}")
        if self.audiences and not set(status.audiences or ()) & set(self.audiences):
            raise Unauthenticated(f"bearer token is not for audience {', '.join(self.audiences)}")
        user = status.user
        extra = {k: tuple(v or ()) for k, v in (user.extra or {}).items()}
        return Caller(user.username, user.uid or "", tuple(user.groups or ()), extra)


class AccessReviewer:
    """SubjectAccessReview for a caller (see the module docstring)."""

    def __init__(self, api_client: Callable[[], Any] | Any) -> None:
        self._api_client = api_client

    def allowed(self, caller: Caller, *, verb: str, group: str, resource: str, namespace: str = "",
                name: str = "") -> bool:
        from kubernetes import client

        api_client = self._api_client() if callable(self._api_client) else self._api_client
        spec = client.V1SubjectAccessReviewSpec(
            user=caller.username, uid=caller.uid or None, groups=list(caller.groups) or None,
            extra={k: list(v) for k, v in caller.extra.items()} or None,
            resource_attributes=client.V1ResourceAttributes(verb=verb, group=group, resource=resource,
                                                            namespace=namespace or None, name=name or None))
        try:
            answer = client.AuthorizationV1Api(api_client).create_subject_access_review(
                client.V1SubjectAccessReview(spec=spec), _request_timeout=15)
        except _api_errors() as exc:
            status = getattr(exc, "status", None)
            raise Unavailable(f"SubjectAccessReview failed: API server "
                              f"{'answered ' + str(status) if status else 'unreachable'}") from exc
        return bool(answer.status is not None and answer.status.allowed and not answer.status.denied)

    def require(self, caller: Caller, *, verb: str, group: str, resource: str, namespace: str = "",
                name: str = "") -> None:
        if not self.allowed(caller, verb=verb, group=group, resource=resource, namespace=namespace, name=name):
            what = f"{resource}.{group}" if group else resource
            where = f" {namespace}/{name}" if namespace else f" {name}"
            raise PermissionDenied(f"{caller.username} may not {verb} {what}{where.rstrip()}")


Authorizer = Callable[[Caller, str], None]  # (caller, full method name) -> None or raise PermissionDenied


def allow_service_accounts(*accounts: str) -> Authorizer:
    """An authorizer that admits only the ServiceAccounts ``namespace/name`` (strata's own,
    for node-to-node calls)."""
    allowed = {tuple(a.split("/", 1)) for a in accounts}

    def authorize(caller: Caller, method: str) -> None:
        if caller.service_account not in allowed:
            raise PermissionDenied(f"{caller.username} may not call {method}")

    return authorize


def by_method(rules: Sequence[tuple[str, Authorizer | None]]) -> Authorizer:
    """One authorizer for a listener serving several services: the first rule whose prefix
    starts the full method name (``/package.Service/Method``) decides — ``None`` admits any
    authenticated caller (the handler then decides per object), an authorizer is called;
    a method no rule names is refused (PermissionDenied), so a service added later is closed
    until someone says who may call it."""
    table = tuple(rules)

    def authorize(caller: Caller, method: str) -> None:
        for prefix, rule in table:
            if method.startswith(prefix):
                if rule is not None:
                    rule(caller, method)
                return
        raise PermissionDenied(f"{caller.username} may not call {method} on this listener")

    return authorize


class _CallerContext:
    """The servicer context, plus the authenticated caller."""

    def __init__(self, inner: grpc.ServicerContext, caller: Caller) -> None:
        self._inner = inner
        self.strata_caller = caller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def caller_of(context: object) -> Caller | None:
    """The Caller :class:`TokenAuthInterceptor` attached to ``context`` (None elsewhere)."""
    caller = getattr(context, "strata_caller", None)
    return caller if isinstance(caller, Caller) else None


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The token of the ``authorization`` metadata; Unauthenticated when missing or malformed."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("no bearer token: send metadata 'authorization: Bearer <ServiceAccount token>'")
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    value = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata is not 'Bearer <token>'")
    return token.strip()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call by its bearer token (see the module docstring)."""

    def __init__(self, reviewer: TokenReviewer, authorize: Authorizer | None = None) -> None:
        self.reviewer = reviewer
        self.authorize = authorize

    def _check(self, method: str, context: grpc.ServicerContext) -> _CallerContext:
        caller = self.reviewer.review(bearer_token(context.invocation_metadata()))
        if self.authorize is not None:
            self.authorize(caller, method)
        log.debug("call %s by %s", method, caller.username)
        return _CallerContext(context, caller)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        check = self._check

        def single(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                return behavior(request, check(method, context))
            return wrapped

        def streamed(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                yield from behavior(request, check(method, context))
            return wrapped

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(single(handler.unary_unary), **kw)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(single(handler.stream_unary), **kw)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streamed(handler.unary_stream), **kw)
        return grpc.stream_stream_rpc_method_handler(streamed(handler.stream_stream), **kw)
