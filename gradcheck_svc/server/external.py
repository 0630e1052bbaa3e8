"""GradcheckService.CheckExternal: the service drives a check of a function the client evaluates.

The handler reads the client's ``start``, validates it, takes a check slot, and runs the engine in
a thread on a StreamSource: every evaluation or product the engine needs goes out on the stream
and the client's answer comes back through a reader thread. The engine runs only its own torch
arithmetic (no client code). The handler yields the engine's requests, then the Report; any
failure (bad answer, silence, deadline, cancellation, drain) ends the RPC with its status, and the
slot is released on every path.

Memory is held as Check holds it: the engine and the tensors decoded from the client's answers run
under a CheckGuard (``max_check_bytes``), and a check that is not small everywhere (``plan.is_light``,
as Check decides it: its inputs at once, its outputs and Jacobian once the first answer declares
them) takes ``max_check_bytes`` of
``max_check_bytes_in_flight`` while it runs, or is refused SERVER_BUSY with RetryInfo. It gives it
back when its engine thread ends and, whatever else happens, when the handler ends.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import torch
from grpc_status import rpc_status
from pydantic import ValidationError

import gradcheck_svc as gc
from gradcheck_svc.codec import decode_options, decode_tensor, encode_report, validate_shape
from gradcheck_svc.engine.external import checked_inputs, external_function
from gradcheck_svc.errors import (
    CheckCancelledError,
    CheckError,
    DeviceUnavailableError,
    InvalidOptionError,
    InvalidRequestError,
    LimitExceededError,
    NothingToCheckError,
)
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Report
from gradcheck_svc.server.external_source import NAME, NAME_RULE, ClientFailed, ExchangeEnded, StreamSource
from gradcheck_svc.server.plan import is_light
from gradcheck_svc.server.runner import Deadline, guarded, new_check_id, reported_options
from gradcheck_svc.server.status import Rejection, failure_for
from gradcheck_svc.v1 import gradcheck_pb2 as pb

if TYPE_CHECKING:
    from gradcheck_svc.server.service import GradcheckService

__all__ = ["CheckMemory", "check_external"]

log = logging.getLogger("gradcheck_svc.server")
_REQUEST_LEVEL = (
    InvalidOptionError,
    DeviceUnavailableError,
    CheckCancelledError,
    NothingToCheckError,
    LimitExceededError,
)
_UNSUPPORTED = {
    "compare_devices": "compares torch's CUDA and CPU results; the client's function runs where it runs",
    "order": "order 2 differentiates the vector-Jacobian product, which the client only evaluates",
    "upcast": "the client's function runs in the dtypes it declared",
}


def check_external(
    service: GradcheckService, requests: Iterator[pb.CheckExternalRequest], context: grpc.ServicerContext
) -> Iterator[pb.CheckExternalResponse]:
    check_id = new_check_id()
    started = time.perf_counter()
    label, outcome = "-", "OK"
    run: _Run | None = None
    memory: CheckMemory | None = None
    try:
        inbox = Inbox(requests)
        remaining = context.time_remaining()
        wait = service.settings.external_reply_seconds
        first = inbox.first(wait if remaining is None else min(wait, remaining))
        if not isinstance(first, pb.CheckExternalRequest) or first.WhichOneof("kind") != "start":
            raise InvalidRequestError("start", "the first message of CheckExternal must be `start`")
        start = first.start
        label = start.function[:120] or "external"
        plan = _plan(start, service)
        inputs = sum(t.numel() for t in plan.tensors)
        memory = CheckMemory(service, inputs)
        service.admit()  # the same refusals as Check: SERVER_DRAINING or SERVER_BUSY, with RetryInfo
        try:
            if not is_light(inputs, 0):
                memory.reserve()
            run = _Run(service, plan, start, inbox, context, memory)
        except BaseException:
            service.slots.release()
            raise
        yield from run.messages()
    except Exception as exc:
        failure = failure_for(service.drained(exc), check_id)
        outcome = failure.code.name
        context.abort_with_status(rpc_status.to_status(failure.to_status()))
    finally:
        # Here, not after `yield from`: a client may close the stream on the report, and then
        # no code after the last yield runs.
        if run is not None:
            service.slots.release()
        if memory is not None:
            memory.release()
        log.info(
            "check-external id=%s function=%r requests=%d status=%s duration=%.3fs%s",
            check_id,
            label,
            run.source.requests if run else 0,
            outcome,
            time.perf_counter() - started,
            f" log_tag={run.log_tag}" if run and run.log_tag else "",
        )


@dataclass(frozen=True)
class _Plan:
    """A validated start: the inputs by name, the engine's options, the ones the client set."""

    names: list[str]
    tensors: list[torch.Tensor]
    options: dict[str, Any]
    client_options: set[str]


def _plan(start: pb.ExternalStart, service: GradcheckService) -> _Plan:
    settings = service.settings
    if not start.point.tensors:
        raise InvalidRequestError("start.point.tensors", "needs at least one input")
    total, names, tensors = 0, [], []
    for k, named in enumerate(start.point.tensors):
        where = f"start.point.tensors[{k}]"
        total += validate_shape(named.tensor.shape, settings.max_tensor_elements, f"{where}.tensor.shape")
        if total > settings.max_request_elements:
            raise LimitExceededError(
                f"inputs have more than max_request_elements={settings.max_request_elements}"
            )
        if not NAME.match(named.name) or named.name in names:
            raise InvalidRequestError(f"{where}.name", f"{named.name[:80]!r}: {NAME_RULE}")
        names.append(named.name)
        tensors.append(
            decode_tensor(named.tensor, max_elements=settings.max_tensor_elements, field=f"{where}.tensor")
        )
    options = decode_options(start.options)
    client = set(options)
    for name, value in options.items():
        # NaN or infinite tolerances or steps would turn every verdict into "ok" or into noise.
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"start.options.{name}", f"must be a finite number, got {value}")
    for name, why in _UNSUPPORTED.items():
        value = options.get(name)
        if value is not None and value is not False and not (name == "order" and value == 1):
            raise InvalidRequestError(f"start.options.{name}", f"not supported for external functions: {why}")
    if options.get("device") == "cuda":
        raise InvalidRequestError("start.options.device", "external checks run on the server's CPU")
    if options.get("forward_ad") and not start.has_jvp:
        raise InvalidRequestError("start.options.forward_ad", "needs start.has_jvp (the client's JVPs)")
    if start.max_batch_size < 0:
        raise InvalidRequestError("start.max_batch_size", "must not be negative")
    try:
        CheckOptions(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidRequestError(f"start.options.{'.'.join(map(str, err['loc']))}", err["msg"]) from None
    options["device"] = "cpu"
    options["max_jacobian_entries"] = min(
        options.get("max_jacobian_entries") or 2**62, settings.max_jacobian_entries
    )
    options["max_evaluations"] = min(options.get("max_evaluations") or 2**62, settings.max_evaluations)
    return _Plan(names, tensors, options, client)


class CheckMemory:
    """One external check's share of ``max_check_bytes_in_flight``: taken at most once, given back
    at most once, from whichever thread ends first."""

    def __init__(self, service: GradcheckService, inputs: int = 0) -> None:
        self._service = service
        self._inputs = inputs  # elements of the checked point
        self._held = 0
        self._lock = threading.Lock()

    def reserve(self) -> None:
        """Take ``max_check_bytes``, or raise the refusal Check gives (SERVER_BUSY, RetryInfo)."""
        with self._lock:
            if self._held:
                return
            self._held = self._service.take_check_memory()

    def outputs_known(self, elements: int) -> None:
        if not is_light(self._inputs, elements):
            self.reserve()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, 0
        if held:
            self._service.check_bytes.give_back(held)


_END = object()
_MAX_AHEAD = 2  # a client answers only what it was asked: more unread messages than this is a flood


class Inbox:
    """The client's messages, read on a thread of their own so that waiting for one can time out.

    At most a few are held: a client that sends what nobody asked for is told so (a string in
    the queue, which the waiting side raises) and no longer read. None marks the end.
    """

    def __init__(self, requests: Iterator[pb.CheckExternalRequest]) -> None:
        self.messages: queue.Queue[pb.CheckExternalRequest | str | None] = queue.Queue()
        self._requests = requests
        threading.Thread(target=self._read, name="gradcheck-external-reader", daemon=True).start()

    def first(self, timeout: float) -> pb.CheckExternalRequest | str | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise Rejection(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no `start` message within {timeout:g} s"
            ) from None

    def _read(self) -> None:
        try:
            for message in self._requests:
                if self.messages.qsize() >= _MAX_AHEAD:
                    self.messages.put("the client sent messages the server did not ask for")
                    return
                self.messages.put(message)
        except Exception:  # the client went away; the waiting side sees the end below
            log.debug("CheckExternal reader stopped", exc_info=True)
        finally:
            self.messages.put(None)


class _Run:
    """One check: the engine thread, the reader thread, and the messages the handler yields."""

    def __init__(
        self,
        service: GradcheckService,
        plan: _Plan,
        start: pb.ExternalStart,
        inbox: Inbox,
        context: grpc.ServicerContext,
        memory: CheckMemory,
    ) -> None:
        settings = service.settings
        self.plan = plan
        self.memory = memory
        self.max_bytes = settings.max_check_bytes
        self.label = start.function[:200] or "external"
        self.log_tag = start.log_tag[:64]
        self.outbox: queue.Queue[Any] = queue.Queue()
        self.cancel = threading.Event()
        context.add_callback(self.cancel.set)
        self.stopped = service.stopper(self.cancel)
        self.deadline = Deadline.start(context.time_remaining(), settings.max_check_seconds)
        max_batch = settings.max_external_batch
        self.source = StreamSource(
            inputs=list(zip(plan.names, plan.tensors, strict=True)),
            checked=checked_inputs(plan.tensors),
            has_jvp=start.has_jvp,
            max_batch=min(start.max_batch_size, max_batch) if start.max_batch_size else max_batch,
            max_elements=settings.max_tensor_elements,
            reply_seconds=settings.external_reply_seconds,
            deadline=self.deadline,
            cancelled=self.stopped,
            send=self.outbox.put,
            answers=inbox.messages,
            outputs_known=memory.outputs_known,
        )
        self._served_by = service.served_by

    def messages(self) -> Iterator[pb.CheckExternalResponse]:
        engine = threading.Thread(target=self._check, name="gradcheck-external", daemon=True)
        engine.start()
        try:
            while True:
                item = self.outbox.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel.set()  # whatever ended the handler, the engine thread stops asking
            engine.join()

    def _check(self) -> None:
        try:
            report = guarded(self._report, self.deadline, self.stopped, self.max_bytes)
            self.outbox.put(pb.CheckExternalResponse(report=encode_report(report)))
            self.outbox.put(_END)
        except BaseException as exc:
            self.outbox.put(exc)
        finally:
            self.memory.release()  # the engine's tensors are gone with its thread

    def _report(self) -> Report:
        fn = external_function(self.source, self.label)
        try:
            report = gc.check(
                fn,
                *self.plan.tensors,
                input_names=self.plan.names,
                deadline=self.deadline.at,
                cancelled=self.stopped,
                **self.plan.options,
            )
        except Exception as exc:
            ended = self.source.ended
            if isinstance(ended, ClientFailed):
                return self._error_report(f"the client's function failed: {ended}")
            if ended is not None:
                raise ended from None
            if isinstance(exc, ExchangeEnded):
                raise exc.cause from None
            if isinstance(exc, LimitExceededError) and self.deadline.passed():
                raise self.deadline.rejection() from None
            if isinstance(exc, CheckError) and not isinstance(exc, _REQUEST_LEVEL):
                return self._error_report(str(exc))  # as run_plan: the function's problem, not the RPC's
            raise
        kept = reported_options(report, self.plan.client_options)
        return report.model_copy(update={"point": 0, "served_by": self._served_by, "options": kept})

    def _error_report(self, message: str) -> Report:
        dtypes = sorted(
            {str(t.dtype).removeprefix("torch.") for t in self.plan.tensors if t.is_floating_point()}
        )
        return Report(
            ok=False,
            error=message,
            dtype=",".join(dtypes),
            device="cpu",
            function=self.label,
            point=0,
            served_by=self._served_by,
        )
