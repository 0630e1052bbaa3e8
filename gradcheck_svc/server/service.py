"""The GradcheckService servicer: request -> plan -> engine -> response, with limits and a log line."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import torch
from grpc_status import rpc_status

import gradcheck_svc as gc
from gradcheck_svc.codec import DTYPES, encode_duration
from gradcheck_svc.errors import CheckCancelledError
from gradcheck_svc.report import Report
from gradcheck_svc.server.external import check_external
from gradcheck_svc.server.isolation import WorkerPool
from gradcheck_svc.server.limiter import ByteBudget, CheckSlots
from gradcheck_svc.server.plan import CheckPlan, runs_in_worker
from gradcheck_svc.server.plan_cache import PlanCache
from gradcheck_svc.server.response_size import fit_response
from gradcheck_svc.server.runner import Deadline, PointProgress, execute, new_check_id
from gradcheck_svc.server.status import Rejection, failure_for
from gradcheck_svc.settings import Settings
from gradcheck_svc.specs import EXPRESSION_FUNCTIONS, FunctionRegistry
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

__all__ = ["GradcheckService"]

log = logging.getLogger("gradcheck_svc.server")
_DONE = object()
_UNCOUNTED_BYTES = 64 * 1024  # requests this small stay off the byte budget (and its lock)
_PROGRESS_EVERY = 0.5  # seconds between progress messages of one check


class GradcheckService(pb_grpc.GradcheckServiceServicer):
    def __init__(
        self,
        settings: Settings,
        registry: FunctionRegistry,
        *,
        check_fn: Callable[..., Report] = gc.check,
        workers: WorkerPool | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.check_fn = check_fn
        self.plans = PlanCache(settings, registry)
        self.served_by = settings.served_by
        self.slots = CheckSlots(settings.max_concurrent_checks)
        self.request_bytes = ByteBudget(settings.max_request_bytes_in_flight)
        # Each guarded check may grow to max_check_bytes: the server-wide sum of those is capped.
        self.check_bytes = ByteBudget(settings.check_bytes_in_flight)
        self.draining = threading.Event()
        self.cut_off = threading.Event()  # the drain's grace ran out: running checks stop now
        self.workers = workers  # None: every check runs in the handler thread
        self._stream_pool = ThreadPoolExecutor(
            settings.max_concurrent_checks, thread_name_prefix="gradcheck-stream"
        )

    def start_draining(self) -> None:
        """From now on nothing new starts: new calls and stream items get UNAVAILABLE, and stream
        items still queued are cancelled (their done-callbacks answer them UNAVAILABLE)."""
        self.draining.set()
        self._stream_pool.shutdown(wait=False, cancel_futures=True)

    def cut_off_running(self) -> None:
        """The drain's grace is over: running checks stop at their next op (a worker is killed) and
        answer UNAVAILABLE (``SERVER_DRAINING``) themselves, instead of gRPC's bare cancellation."""
        self.cut_off.set()

    def stopper(self, cancel: threading.Event) -> Callable[[], bool]:
        """The ``cancelled`` test of one check: its client cancelled, or the drain cut it off."""
        cut_off = self.cut_off
        return lambda: cancel.is_set() or cut_off.is_set()

    def drained(self, exc: Exception) -> Exception:
        """``exc`` as the client should see it: a check stopped by the drain's end is UNAVAILABLE."""
        stopped = isinstance(exc, CheckCancelledError) or (
            isinstance(exc, Rejection) and exc.code == grpc.StatusCode.CANCELLED
        )
        if not (stopped and self.cut_off.is_set()):
            return exc
        return Rejection(
            grpc.StatusCode.UNAVAILABLE,
            f"the server shut down before the check finished (grace_seconds="
            f"{self.settings.grace_seconds:g}); checks have no side effects: retry it elsewhere",
            reason="SERVER_DRAINING",
            retry_after=0.0,
        )

    def close(self) -> None:
        self.start_draining()
        if self.workers is not None:
            self.workers.close()

    def _draining(self) -> Rejection:
        return Rejection(
            grpc.StatusCode.UNAVAILABLE, "server is shutting down", reason="SERVER_DRAINING", retry_after=0.0
        )

    def _busy(self) -> Rejection:
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server busy: {self.slots.size} checks already running (max_concurrent_checks)",
            reason="SERVER_BUSY",
            limit=("max_concurrent_checks", str(self.slots.size)),
            retry_after=1.0,
        )

    # ------------------------------------------------------------------------- Check

    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        check_id = new_check_id()
        try:
            self.admit()
        except Rejection as exc:
            self._log(check_id, request, None, None, 0.0, exc.code.name)
            context.abort_with_status(rpc_status.to_status(failure_for(exc, check_id).to_status()))
        try:
            # Polled by the check between its steps: the call's own state (cancelled by the client
            # or past its deadline), read where it is kept, with no event or callback of our own.
            active, cut_off = context.is_active, self.cut_off.is_set
            return self._run(
                check_id,
                request,
                context.time_remaining(),
                lambda: cut_off() or not active(),
                # The log line is written once the answer is sent, not before: after a check it
                # costs a tenth of a millisecond or more, which the client would wait for.
                log_later=context.add_callback,
            )
        except Exception as exc:  # every failure becomes a status
            failure = failure_for(self.drained(exc), check_id)
            context.abort_with_status(rpc_status.to_status(failure.to_status()))
            raise  # unreachable: abort raises
        finally:
            self.slots.release()

    def admit(self) -> None:
        """Take a check slot, or refuse: draining, or every slot busy."""
        if self.draining.is_set():
            raise self._draining()
        if not self.slots.try_acquire():
            raise self._busy()

    def _run(
        self,
        check_id: str,
        request: pb.CheckRequest,
        remaining: float | None,
        cancelled: Callable[[], bool],
        progress: PointProgress | None = None,
        wait_for_memory: Callable[[], Rejection | None] | None = None,
        log_later: Callable[[Callable[[], None]], bool] | None = None,
        bytes_held: bool = False,
    ) -> pb.CheckResponse:
        """plan -> deadline -> run -> encode, in this thread or in a worker process. A check that
        does not fit in the check memory left is refused, or, given ``wait_for_memory`` (the
        refusal to raise once waiting is pointless, else None), waits for it as a stream's items
        wait for a slot. ``log_later`` (a call's ``add_callback``) writes the check's log line
        when the call ends instead of before the answer; where it cannot (the call has ended
        already), the line is written at once."""
        started = time.perf_counter()
        plan: CheckPlan | None = None
        response: pb.CheckResponse | None = None
        status = "OK"
        size = request.ByteSize()
        counted = size > _UNCOUNTED_BYTES and not bytes_held  # a stream item's were taken when read
        if counted and not self.request_bytes.try_take(size):
            refusal = self._too_many_bytes(size)
            self._log(check_id, request, None, None, time.perf_counter() - started, refusal.code.name)
            raise refusal
        reserved = 0
        try:
            plan = self.plans.plan(request)  # validated here, even if isolated
            if not plan.light:  # a light check is small everywhere, sized up front
                if wait_for_memory is None:
                    reserved = self.take_check_memory()
                else:
                    each = self.settings.max_check_bytes
                    if not self.check_bytes.take(each, give_up=lambda: wait_for_memory() is not None):
                        raise wait_for_memory() or self._out_of_check_memory()
                    reserved = each
            deadline = Deadline.start(remaining, self.settings.max_check_seconds)
            isolated = runs_in_worker(self.settings.isolation, plan.operator_code, plan.light)
            if self.workers is not None and isolated:
                response = self.workers.run(
                    request.SerializeToString(),
                    deadline=deadline,
                    cancelled=cancelled,
                    check_id=check_id,
                    served_by=self.served_by,
                    progress=progress,
                )
            else:
                response = execute(
                    plan,
                    deadline=deadline,
                    cancelled=cancelled,
                    served_by=self.served_by,
                    check_id=check_id,
                    max_bytes=self.settings.max_check_bytes,
                    check_fn=self.check_fn,
                    progress=progress,
                )
            response = fit_response(response, self.settings.max_message_bytes)
            return response
        except Exception as exc:
            status = failure_for(exc, check_id, quiet=True).code.name  # logged where it is answered
            raise
        finally:
            if counted:
                self.request_bytes.give_back(size)
            if reserved:
                self.check_bytes.give_back(reserved)
            if log.isEnabledFor(logging.INFO):
                seconds = time.perf_counter() - started

                def line() -> None:
                    self._log(check_id, request, plan, response, seconds, status)

                if log_later is None or not log_later(line):
                    line()

    def take_check_memory(self) -> int:
        """A check's share of max_check_bytes_in_flight (``max_check_bytes``), for ``check_bytes
        .give_back``; past the budget, the refusal (SERVER_BUSY, RetryInfo) is raised."""
        each = self.settings.max_check_bytes
        if not self.check_bytes.try_take(each):
            raise self._out_of_check_memory()
        return each

    def _out_of_check_memory(self) -> Rejection:
        budget, each = self.check_bytes.size, self.settings.max_check_bytes
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server busy: the checks running hold {self.check_bytes.used} bytes of memory "
            f"(max_check_bytes={each} each) and this one would pass max_check_bytes_in_flight={budget}",
            reason="SERVER_BUSY",
            limit=("max_check_bytes_in_flight", str(budget)),
            retry_after=1.0,
        )

    def _too_many_bytes(self, size: int) -> Rejection:
        budget = self.request_bytes.size
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"server busy: requests of {self.request_bytes.used} bytes are being checked and this one has "
            f"{size}, more than max_request_bytes_in_flight={budget} allows at once",
            reason="SERVER_BUSY",
            limit=("max_request_bytes_in_flight", str(budget)),
            retry_after=1.0,
        )

    def _log(
        self,
        check_id: str,
        request: pb.CheckRequest,
        plan: CheckPlan | None,
        response: pb.CheckResponse | None,
        seconds: float,
        status: str,
    ) -> None:
        if not log.isEnabledFor(logging.INFO):  # nothing of the line is built when it goes nowhere
            return
        reports = None if response is None else response.reports
        function = plan.label if plan else _function_label(request)
        points = len(plan.points) if plan else _point_count(request)
        device = reports[0].device_name if reports else (plan.device if plan else "-")
        ok = "-" if reports is None else str(all(r.ok for r in reports)).lower()
        # A client's log tag goes into the log printable and unbroken: no forged log lines.
        extra = f" log_tag={_printable(request.log_tag[:64])}" if request.log_tag else ""
        log.info(
            "check id=%s function=%r points=%d device=%s ok=%s status=%s duration=%.3fs%s",
            check_id,
            function[:120],
            points,
            device,
            ok,
            status,
            seconds,
            extra,
        )

    # ------------------------------------------------------------------------- CheckWithProgress

    def CheckWithProgress(
        self, wrapped: pb.CheckWithProgressRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.CheckWithProgressResponse]:
        """Check, run in a helper thread while this one streams its progress (at most every
        ``_PROGRESS_EVERY`` seconds, and the last step of each point), then the response."""
        request = wrapped.request
        check_id = new_check_id()
        try:
            self.admit()
        except Rejection as exc:
            self._log(check_id, request, None, None, 0.0, exc.code.name)
            context.abort_with_status(rpc_status.to_status(failure_for(exc, check_id).to_status()))
        events: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()
        context.add_callback(cancel.set)
        remaining = context.time_remaining()
        last = [0.0]

        def progress(point: int, done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - last[0] < _PROGRESS_EVERY:
                return
            last[0] = now
            events.put(pb.CheckProgress(point=point, done_count=done, total_count=total))

        def work() -> None:
            try:
                events.put(self._run(check_id, request, remaining, self.stopper(cancel), progress))
            except Exception as exc:  # answered below, in the handler's thread
                events.put(self.drained(exc))
            finally:
                self.slots.release()

        threading.Thread(target=work, name="gradcheck-progress", daemon=True).start()
        while True:
            event = events.get()
            if isinstance(event, pb.CheckProgress):
                yield pb.CheckWithProgressResponse(progress=event)
            elif isinstance(event, Exception):
                context.abort_with_status(rpc_status.to_status(failure_for(event, check_id).to_status()))
            else:
                yield pb.CheckWithProgressResponse(response=event)
                return

    # ------------------------------------------------------------------------- CheckStream

    def CheckStream(
        self, request_iterator: Iterator[pb.CheckStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.CheckStreamResponse]:
        """Items run concurrently (at most ``stream_window`` at once) and are answered as they end;
        an answer not yet sent (the client does not read) counts against the window too.

        Draining: items that arrive, or are still queued, after SIGTERM are answered UNAVAILABLE
        and nothing new starts; once nothing is running the stream ends UNAVAILABLE. A stream
        with nothing running and nothing arriving for ``stream_idle_seconds`` is closed, so idle
        streams cannot hold the server's threads.
        """
        answers: queue.Queue[Any] = queue.Queue()
        window = threading.Semaphore(self.settings.stream_window)
        cancel = threading.Event()
        context.add_callback(cancel.set)
        counts = {"submitted": 0}
        last_activity = [time.monotonic()]

        def stopped() -> bool:
            return cancel.is_set() or self.draining.is_set()

        def read() -> None:
            try:
                for item in request_iterator:
                    last_activity[0] = time.monotonic()
                    counts["submitted"] += 1
                    # Backpressure: every answer holds a place in the window until it is sent, so
                    # a client that never reads its answers stops being read (answers cannot pile up).
                    while not window.acquire(timeout=0.1):
                        if cancel.is_set():
                            return
                    if self.draining.is_set():
                        answers.put(self._stream_error(item, self._draining()))
                        continue
                    # An item read and waiting holds its bytes too: the reader waits for room in
                    # max_request_bytes_in_flight before it reads on, so items read ahead stay bounded.
                    held = self.request_bytes.hold(item.request.ByteSize(), _UNCOUNTED_BYTES, give_up=stopped)
                    if held is None:
                        if cancel.is_set():
                            return
                        answers.put(self._stream_error(item, self._draining()))
                        continue
                    self._submit(item, context, cancel, answers, held)
            except Exception:  # the client went away while we read; nothing to answer
                log.debug("CheckStream reader stopped", exc_info=True)
            finally:
                answers.put(_DONE)

        threading.Thread(target=read, name="gradcheck-stream-reader", daemon=True).start()
        done, answered = False, 0
        while not done or answered < counts["submitted"]:
            if cancel.is_set():
                return
            try:
                answer = answers.get(timeout=0.1)
            except queue.Empty:
                idle = answered == counts["submitted"]
                if idle and self.draining.is_set():
                    context.abort_with_status(rpc_status.to_status(failure_for(self._draining()).to_status()))
                if idle and time.monotonic() - last_activity[0] > self.settings.stream_idle_seconds:
                    seconds = f"{self.settings.stream_idle_seconds:g}"
                    idle_out = Rejection(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"stream closed after {seconds} s without an item (stream_idle_seconds)",
                        reason="STREAM_IDLE",
                        limit=("stream_idle_seconds", seconds),
                    )
                    context.abort_with_status(rpc_status.to_status(failure_for(idle_out).to_status()))
                continue
            if answer is _DONE:
                done = True
                continue
            answered += 1
            last_activity[0] = time.monotonic()
            yield answer
            window.release()  # sent: the reader may take the next item

    def _submit(
        self,
        item: pb.CheckStreamRequest,
        context: grpc.ServicerContext,
        cancel: threading.Event,
        answers: queue.Queue[Any],
        held: int = 0,
    ) -> None:
        def if_never_run(future: Future[None]) -> None:
            if future.cancelled():  # queued when the server closed: still owed an answer
                answers.put(self._stream_error(item, self._draining()))
            if held:  # run or not, the item is done with its bytes
                self.request_bytes.give_back(held)

        try:
            future = self._stream_pool.submit(self._stream_item, item, context, cancel, answers)
        except RuntimeError:  # the pool is shut down
            answers.put(self._stream_error(item, self._draining()))
            if held:
                self.request_bytes.give_back(held)
            return
        future.add_done_callback(if_never_run)

    def _stream_error(self, item: pb.CheckStreamRequest, exc: Exception, check_id: str = "") -> Any:
        return pb.CheckStreamResponse(id=item.id, error=failure_for(exc, check_id).to_status())

    def _stream_item(
        self,
        item: pb.CheckStreamRequest,
        context: grpc.ServicerContext,
        cancel: threading.Event,
        answers: queue.Queue[Any],
    ) -> None:
        check_id = new_check_id()
        try:
            remaining = context.time_remaining()
            deadline = Deadline.start(remaining, self.settings.max_check_seconds)
            cancelled = Rejection(grpc.StatusCode.CANCELLED, "the client cancelled the stream")

            def stop_waiting() -> Rejection | None:
                """Why this item should stop waiting (for a slot, for check memory), or None."""
                if self.draining.is_set():
                    return self._draining()
                if deadline.passed():
                    return deadline.rejection()
                return cancelled if cancel.is_set() else None

            if not self.slots.acquire(give_up=lambda: stop_waiting() is not None):
                raise stop_waiting() or cancelled
            try:
                if self.draining.is_set():  # a slot freed by the drain itself starts nothing new
                    raise self._draining()
                response = self._run(
                    check_id,
                    item.request,
                    context.time_remaining(),
                    self.stopper(cancel),
                    wait_for_memory=stop_waiting,
                    bytes_held=True,
                )
            finally:
                self.slots.release()
            answers.put(pb.CheckStreamResponse(id=item.id, response=response))
        except Exception as exc:  # an item's failure is its answer; the stream goes on
            answers.put(self._stream_error(item, self.drained(exc), check_id))

    # ------------------------------------------------------------------------- CheckExternal

    def CheckExternal(
        self, request_iterator: Iterator[pb.CheckExternalRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.CheckExternalResponse]:
        return check_external(self, request_iterator, context)

    # ------------------------------------------------------------------------- GetCapabilities

    def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetCapabilitiesResponse:
        s = self.settings
        cuda = torch.cuda.is_available()
        devices = [pb.DeviceInfo(name="cpu", available=True, description="CPU")]
        if cuda:
            devices += [
                pb.DeviceInfo(name=f"cuda:{i}", available=True, description=torch.cuda.get_device_name(i))
                for i in range(torch.cuda.device_count())
            ]
        return pb.GetCapabilitiesResponse(
            server_version=gc.__version__,
            torch_version=torch.__version__,
            devices=devices,
            cuda_available=cuda,
            default_device=s.device,
            dtypes=[pb.Dtype.ValueType(d) for d in DTYPES],
            expression_functions=sorted(EXPRESSION_FUNCTIONS),
            registered_functions=self.registry.names(),
            limits=pb.Limits(
                max_message_bytes=s.max_message_bytes,
                max_tensor_elements=s.max_tensor_elements,
                max_request_elements=s.max_request_elements,
                max_points=s.max_points,
                max_jacobian_entries=s.max_jacobian_entries,
                max_evaluations=s.max_evaluations,
                max_check_duration=encode_duration(s.max_check_seconds),
                max_concurrent_checks=s.max_concurrent_checks,
                max_expression_length=s.max_expression_length,
                max_external_batch_size=s.max_external_batch,
                max_external_reply_duration=encode_duration(s.external_reply_seconds),
                max_calls_per_client=s.calls_per_client,
                max_request_tensors=s.max_request_tensors,
                max_request_bytes_in_flight=s.max_request_bytes_in_flight,
                max_check_bytes_in_flight=s.check_bytes_in_flight,
            ),
            served_by=self.served_by,
        )


def _printable(text: str) -> str:
    return "".join(c if " " < c <= "~" else "?" for c in text)


def _function_label(request: pb.CheckRequest) -> str:
    kind = request.function.WhichOneof("kind")
    if kind == "expression":
        return request.function.expression
    if kind == "registered":
        return request.function.registered.name
    return "-"


def _point_count(request: pb.CheckRequest) -> int:
    if request.WhichOneof("points") == "explicit_points":
        return len(request.explicit_points.points)
    if request.WhichOneof("points") == "sampling":
        return request.sampling.point_count or 1
    return 0
