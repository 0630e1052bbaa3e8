"""One client's share of the server: at most ``max_calls_per_client`` of its calls run at once.

Without it one client holding every check slot and handler thread (many calls, or open streams
that send nothing) turns every other client away with RESOURCE_EXHAUSTED for as long as it likes.
A client is its bearer token when the server has tokens (however many connections it opens). Without
tokens it is its IP address by default: counting connections would let one process that opens many
of them take as many shares. The trade-off is a proxy or NAT in front of the server, where every
client arrives from one address and all share one share; there, give clients tokens, or set
``client_identity=connection`` (each connection a client, the port included). A call beyond the
share gets RESOURCE_EXHAUSTED, reason ``CLIENT_BUSY``, with ``RetryInfo``, before its request is
read (see request_body.py): a client past its share cannot make the server receive and parse
messages it will refuse. Reflection streams are counted too (each holds a handler thread while it
is open), and so are health Watch streams (open without a token, and each one counts against
gRPC's ``maximum_concurrent_rpcs``). Health checks and GetCapabilities are cheap and not counted,
but every unary call, counted or not, gets ``request_body_seconds`` for its request message.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import grpc
from grpc_status import rpc_status

from gradcheck_svc.server.request_body import BodyWatch, as_request_streaming
from gradcheck_svc.server.status import Rejection, failure_for

__all__ = ["ClientShare", "ClientShareInterceptor", "peer_address"]

_COUNTED = ("/gradcheck_svc.v1.GradcheckService/", "/grpc.reflection.v1alpha.ServerReflection/")
_FREE = {"/gradcheck_svc.v1.GradcheckService/GetCapabilities"}
# Open without a token, and each open stream counts against gRPC's maximum_concurrent_rpcs: counted,
# so that one client cannot open enough of them to have every other call refused.
_WATCH = "/grpc.health.v1.Health/Watch"


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


def client_of(context: grpc.ServicerContext, by_token: bool, by_connection: bool = False) -> str:
    """The bearer token's digest when tokens identify clients, else the peer's address (with its
    port when each connection is a client of its own)."""
    if by_token:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = value.decode("latin-1") if isinstance(value, bytes) else value
                return "token:" + hashlib.sha256(token.encode()).hexdigest()
    peer = context.peer()
    return "peer:" + (peer if by_connection else peer_address(peer))


@functools.lru_cache(maxsize=4096)  # a connection's calls share its peer string: parsed once
def peer_address(peer: str) -> str:
    """gRPC's peer string without its port: ``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``,
    ``ipv6:%5B::1%5D:51234`` -> ``ipv6:::1``; an IPv4 address mapped into IPv6 is the IPv4 address
    (one host on a dual-stack socket is one client). Other kinds (``unix:``) are kept whole."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return peer
    host = unquote(rest.rpartition(":")[0]).strip("[]")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # a zone (fe80::1%eth0) is not the host
    except ValueError:
        return peer
    mapped = getattr(address, "ipv4_mapped", None)
    return f"ipv4:{mapped}" if mapped is not None else f"ipv{address.version}:{address}"


class ClientShareInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generics are stub-only
    def __init__(
        self, limit: int, *, by_token: bool, by_connection: bool = False, body_seconds: float = 30.0
    ) -> None:
        self.share = ClientShare(limit)
        self._by_token = by_token
        self._by_connection = by_connection
        self.body_watch = BodyWatch(body_seconds)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        counted = details.method.startswith(_COUNTED) and details.method not in _FREE
        if details.method == _WATCH and _served_apart(handler):
            wrapped = self._counted_apart(handler)
        elif not counted and _served_apart(handler):
            wrapped = handler  # health: its own small pool and non-blocking Watch stay as they are
        elif not handler.request_streaming:  # counted or not: the body is read here, within its time
            wrapped = as_request_streaming(handler, self.body_watch, self._enter if counted else _nothing)
        elif counted:
            wrapped = self._wrap(handler)
        else:
            wrapped = handler
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _enter(self, context: grpc.ServicerContext) -> Callable[[], None]:
        """Count the call against its client, or refuse it; returns what gives the share back."""
        client = client_of(context, self._by_token, self._by_connection)
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

        return release

    def _counted_apart(self, handler: Any) -> Any:
        """A server-streaming handler served outside the main pool (health's Watch), counted, with
        its pool and non-blocking way kept."""
        inner = handler.unary_stream

        def behaviour(request: Any, context: grpc.ServicerContext, *more: Any, **named: Any) -> Any:
            release = self._enter(context)
            if not context.add_callback(release):  # the call has already ended
                release()
            return inner(request, context, *more, **named)

        for name in ("experimental_non_blocking", "experimental_thread_pool"):
            if hasattr(inner, name):
                setattr(behaviour, name, getattr(inner, name))
        return grpc.unary_stream_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, handler: Any) -> Any:
        """A request-streaming handler whose calls are counted (nothing is read before they are)."""
        inner = handler.stream_unary or handler.stream_stream

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            release = self._enter(context)
            if handler.response_streaming:  # the handler returns at once; the stream ends later
                if not context.add_callback(release):  # the call has already ended
                    release()
                return inner(request, context)
            # A single answer: the share comes back before it is sent, so a client that sends its
            # next call the moment it has the answer is not refused for the call just finished.
            try:
                return inner(request, context)
            finally:
                release()

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _nothing(context: grpc.ServicerContext) -> None:
    return None


def _served_apart(handler: Any) -> bool:
    """Whether gRPC runs this handler outside the main pool (an ``experimental_thread_pool`` of its
    own, or non-blocking): it holds none of the threads the checks need, and wrapping it would lose
    that."""
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    return getattr(inner, "experimental_thread_pool", None) is not None or bool(
        getattr(inner, "experimental_non_blocking", False)
    )
