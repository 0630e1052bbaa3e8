"""A request body that is not valid protobuf is the client's mistake: INVALID_ARGUMENT, not INTERNAL.

grpc's generated handlers deserialize before the servicer runs and answer INTERNAL when that
fails. This interceptor wraps each handler's deserializer so a bad body becomes a marker the
handler turns into INVALID_ARGUMENT (reason BODY_INVALID), for unary and streamed requests alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_status import rpc_status

from gradcheck_svc.server.status import Rejection, failure_for

__all__ = ["DecodeErrorInterceptor"]


_OURS = "/gradcheck_svc.v1.GradcheckService/"  # health and reflection keep their own handling


class _Undecodable:
    """Stands in for a message whose bytes did not parse."""


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, RuntimeError):
            return _Undecodable()

    return parse


def _refuse(context: grpc.ServicerContext) -> None:
    rejection = Rejection(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request body is not a valid protobuf encoding of the method's request message",
        [("request", "does not parse")],
        reason="BODY_INVALID",
    )
    context.abort_with_status(rpc_status.to_status(failure_for(rejection).to_status()))


def _checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Undecodable):
            _refuse(context)
        yield request


class DecodeErrorInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs' generics are stub-only
    def __init__(self) -> None:
        # grpc asks for the handler on every call; a method's handler is the same object each
        # time, so its wrapped twin is built once.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(_OURS):
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


def _wrap(handler: Any) -> Any:
    """``handler`` with a deserializer that marks a bad body, and a behaviour that refuses it."""
    deserialize = _safe(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.request_streaming:
        inner = handler.stream_stream or handler.stream_unary

        def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return inner(_checked(requests, context), context)

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return make(streamed, request_deserializer=deserialize, response_serializer=serialize)
    inner = handler.unary_stream or handler.unary_unary

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            _refuse(context)
        return inner(request, context)

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(unary, request_deserializer=deserialize, response_serializer=serialize)
