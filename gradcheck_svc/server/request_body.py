"""A unary call's request message, read by the handler itself: refusals before the body, a time limit on it.

gRPC reads the request of a unary method before any handler code runs, in a handler thread, and
waits for it as long as the client likes: a client that starts calls and never sends their body
holds every handler thread (no deadline, no end), and a call the server will refuse (a missing
token, a client past its share) is refused only after its whole body, up to ``max_message_bytes``,
has been received and parsed. ``as_request_streaming`` turns such a method's handler into its
request-streaming twin, whose behaviour runs before anything is read: it may refuse at once, then
reads the one message under a ``BodyWatch``, which cancels the call if the body has not arrived
within ``request_body_seconds``. On the wire nothing changes (one message, then half-close).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_status import rpc_status

from gradcheck_svc.server.status import Rejection, failure_for

__all__ = ["BodyWatch", "as_request_streaming", "refuse_before_reading"]

log = logging.getLogger("gradcheck_svc.server")


class BodyWatch:
    """Cancels the calls whose request message is late; one thread, running only while calls wait."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waiting: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._watching = False

    def read(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The first message of ``requests``; INVALID_ARGUMENT when the client sends none."""
        key = next(self._keys)
        with self._lock:
            self._waiting[key] = (time.monotonic() + self.seconds, context)
            if not self._watching:
                self._watching = True
                threading.Thread(target=self._watch, name="gradcheck-body-watch", daemon=True).start()
        try:
            return next(requests)
        except StopIteration:
            refusal = Rejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the call ended without its request message",
                [("request", "missing")],
                reason="REQUEST_INVALID",
            )
            context.abort_with_status(rpc_status.to_status(failure_for(refusal).to_status()))
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def _watch(self) -> None:
        done = False
        while not done:
            time.sleep(min(0.25, self.seconds / 4))
            now = time.monotonic()
            with self._lock:
                late = [(key, context) for key, (due, context) in self._waiting.items() if due <= now]
                for key, _ in late:
                    del self._waiting[key]
                if not self._waiting:  # nothing to watch: the next read starts a new watcher
                    self._watching, done = False, True
            for _, context in late:
                log.info(
                    "call from %s cancelled: no request message within %g s (request_body_seconds)",
                    context.peer(),
                    self.seconds,
                )
                # the read above raises, the thread is free; grpc-stubs leave cancel untyped
                context.cancel()  # type: ignore[no-untyped-call]


Behaviour = Callable[[Any, grpc.ServicerContext], Any]
# Runs before the request is read: may abort the call, or return what to run once the call ends.
BeforeReading = Callable[[grpc.ServicerContext], Callable[[], None] | None]


def as_request_streaming(handler: Any, watch: BodyWatch, before_reading: BeforeReading) -> Any:
    """The request-streaming twin of a unary-request ``handler``: ``before_reading(context)`` runs
    first (it may abort, or return what to call once the call ends), then the one message is read
    under ``watch`` and handed to the handler's own behaviour."""
    inner: Behaviour = handler.unary_unary or handler.unary_stream

    if handler.response_streaming:

        def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            after = before_reading(context)
            if after is not None and not context.add_callback(after):  # the call has already ended
                after()
            return inner(watch.read(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            streamed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def single(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        after = before_reading(context)
        # A single answer: what the call holds comes back before the answer is sent, so a client
        # that sends its next call the moment it has the answer is not refused for this one.
        try:
            return inner(watch.read(requests, context), context)
        finally:
            if after is not None:
                after()

    return grpc.stream_unary_rpc_method_handler(
        single,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def refuse_before_reading(handler: Any, status: Any) -> Any:
    """A handler of ``handler``'s response kind that answers ``status`` before reading any request."""

    def abort(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.stream_unary_rpc_method_handler(abort)
