"""Optional bearer-token authentication: ``authorization: Bearer <token>`` metadata on every call.

Tokens are compared in constant time against every configured token (no early exit that would
tell which one almost matched); both sides are SHA-256 digests first, so neither the time nor the
answer depends on a token's length. The health service stays open so load balancers can probe.
A refusal is UNAUTHENTICATED with the same google.rpc.ErrorInfo (reason TOKEN_INVALID) as every
other error of the service, so a client in any language can branch on it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_status import rpc_status

from gradcheck_svc.server.request_body import refuse_before_reading
from gradcheck_svc.server.status import Rejection, failure_for

__all__ = ["TokenAuthInterceptor"]

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generics are stub-only
    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("TokenAuthInterceptor needs at least one token, and no empty one")
        self._tokens = [_digest(t.encode()) for t in tokens]

    def _authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        if not given:  # "Bearer" with nothing after it
            return False
        digest = _digest(given)
        matches = [hmac.compare_digest(digest, t) for t in self._tokens]  # all compared, always
        return any(matches)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(_OPEN_PREFIXES) or self._authorized(details.invocation_metadata):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        return _deny(handler)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _deny(handler: Any) -> Any:
    """Refuses before the request is read: an unauthenticated client cannot make the server
    receive and parse a message of up to max_message_bytes, nor hold a thread by never sending one."""
    refusal = Rejection(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')",
        reason="TOKEN_INVALID",
    )
    return refuse_before_reading(handler, rpc_status.to_status(failure_for(refusal).to_status()))
