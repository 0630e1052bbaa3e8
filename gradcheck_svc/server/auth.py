"""Optional bearer-token authentication: ``authorization: Bearer <token>`` metadata on every call.

Tokens are compared in constant time against every configured token (no early exit that would
tell which one almost matched). The health service stays open so load balancers can probe.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

import grpc

__all__ = ["TokenAuthInterceptor"]

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generics are stub-only
    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens or any(not t for t in tokens):
            raise ValueError("TokenAuthInterceptor needs at least one token, and no empty one")
        self._tokens = [t.encode() for t in tokens]

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
        matches = [hmac.compare_digest(given, t) for t in self._tokens]  # all compared, always
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


def _deny(handler: Any) -> Any:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
