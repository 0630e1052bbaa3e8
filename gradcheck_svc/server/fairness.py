"""One client's share of the server: at most ``max_calls_per_client`` of its calls run at once.

Without it one client holding every check slot and handler thread (many calls, or open streams
that send nothing) turns every other client away with RESOURCE_EXHAUSTED for as long as it likes.
A client is its bearer token when the server has tokens (however many connections it opens), else
its connection (the peer address and port: without tokens the server knows nothing better). A call
beyond the share gets RESOURCE_EXHAUSTED, reason ``CLIENT_BUSY``, with ``RetryInfo``. Health,
reflection and GetCapabilities are cheap and not counted.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from gradcheck_svc.server.status import Rejection, failure_for

__all__ = ["ClientShare", "ClientShareInterceptor"]

_COUNTED = "/gradcheck_svc.v1.GradcheckService/"
_FREE = {_COUNTED + "GetCapabilities"}


class ClientShare:
    """Calls running per client; taking one beyond ``limit`` fails."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_take(self, client: str) -> bool:
        with self._lock:
            running = self._running.get(client, 0)
            if running >= self.limit:
                return False
            self._running[client] = running + 1
            return True

    def give_back(self, client: str) -> None:
        with self._lock:
            left = self._running[client] - 1
            if left:
                self._running[client] = left
            else:
                del self._running[client]  # the table holds only clients with calls running

    def running(self, client: str) -> int:
        with self._lock:
            return self._running.get(client, 0)


def client_of(context: grpc.ServicerContext, by_token: bool) -> str:
    """The bearer token's digest when tokens identify clients, else the connection's peer."""
    if by_token:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = value.decode("latin-1") if isinstance(value, bytes) else value
                return "token:" + hashlib.sha256(token.encode()).hexdigest()
    return "peer:" + context.peer()


class ClientShareInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generics are stub-only
    def __init__(self, limit: int, *, by_token: bool) -> None:
        self.share = ClientShare(limit)
        self._by_token = by_token
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(_COUNTED) or details.method in _FREE:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _enter(self, context: grpc.ServicerContext) -> None:
        """Count the call against its client until it ends, or refuse it."""
        client = client_of(context, self._by_token)
        if not self.share.try_take(client):
            refusal = Rejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client already has {self.share.limit} calls running (max_calls_per_client); "
                "wait for one to end",
                reason="CLIENT_BUSY",
                limit=("max_calls_per_client", str(self.share.limit)),
                retry_after=1.0,
            )
            context.abort_with_status(rpc_status.to_status(failure_for(refusal).to_status()))
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self.share.give_back(client)

        if not context.add_callback(release):  # the call has already ended
            release()

    def _wrap(self, handler: Any) -> Any:
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(context)
            return inner(request, context)

        make: dict[tuple[bool, bool], Callable[..., Any]] = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        return make[(handler.request_streaming, handler.response_streaming)](
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
