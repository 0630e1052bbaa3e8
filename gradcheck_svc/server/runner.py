"""Run a CheckPlan through the engine: one Report per point, within a deadline, cancellable.

``execute`` is the one plan -> deadline -> run -> encode path, the same in a server thread and in
a worker process. Every point runs under a CheckGuard (gradcheck_svc.engine.guard), which holds the
check to ``max_check_bytes`` of live tensors and to its deadline at every torch op; an error the
guard raised is re-raised here even when the function or the engine caught it on the way.

A function that raises (or returns something that is not a tensor) at one point yields a Report
with ``error`` set for that point; the other points still run and the server is unharmed. Errors
about the request as a whole (options, limits, device, deadline, cancellation) propagate.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import torch

import gradcheck_svc as gc
from gradcheck_svc.codec import report_fields
from gradcheck_svc.engine.guard import CheckGuard
from gradcheck_svc.errors import (
    CheckCancelledError,
    DeviceUnavailableError,
    FunctionRaisedError,
    GradcheckError,
    InvalidOptionError,
    LimitExceededError,
    NothingToCheckError,
    OutputTypeError,
)
from gradcheck_svc.report import Report
from gradcheck_svc.server.plan import CheckPlan, PlannedPoint
from gradcheck_svc.server.status import Rejection
from gradcheck_svc.v1 import gradcheck_pb2 as pb

__all__ = ["Deadline", "PointProgress", "execute", "guarded", "new_check_id", "run_plan"]

log = logging.getLogger("gradcheck_svc.server")

CheckFn = Callable[..., Report]
_T = TypeVar("_T")
PointProgress = Callable[[int, int, int], None]  # (point, columns done, columns in all)
# Errors about the request as a whole; everything else the function does is that point's business.
_REQUEST_LEVEL = (InvalidOptionError, DeviceUnavailableError, CheckCancelledError, NothingToCheckError)


@dataclass(frozen=True)
class Deadline:
    """The earlier of the client's deadline and the server's per-check cap; says which one binds."""

    at: float  # time.monotonic() value
    client_binds: bool
    cap_seconds: float

    @classmethod
    def start(cls, client_remaining: float | None, cap_seconds: float) -> Deadline:
        now = time.monotonic()
        client = now + client_remaining if client_remaining is not None else math.inf
        cap = now + cap_seconds
        return cls(at=min(client, cap), client_binds=client <= cap, cap_seconds=cap_seconds)

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def rejection(self) -> Rejection:
        if self.client_binds:
            return Rejection(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the check finished")
        # The server's own cap is a limit like the others: RESOURCE_EXHAUSTED with QuotaFailure.
        return Rejection(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"check did not finish within the server's cap of {self.cap_seconds:g} s (max_check_seconds)",
            limit=("max_check_seconds", f"{self.cap_seconds:g}"),
        )


# Figures of the check the engine resolved itself (the step, the numeric reference): they stay in
# a report beside the options the client set.
_RESOLVED_OPTIONS = ("eps", "reference")


def reported_options(report: Report, client_options: Collection[str]) -> dict[str, Any]:
    """The report's options without those the server imposed (limits, its default device), so a
    report from the service equals the one the same call gives in-process."""
    return {k: v for k, v in report.options.items() if k in client_options or k in _RESOLVED_OPTIONS}


def execute(
    plan: CheckPlan,
    *,
    deadline: Deadline,
    cancelled: Callable[[], bool],
    served_by: str,
    check_id: str,
    max_bytes: int,
    check_fn: CheckFn = gc.check,
    progress: PointProgress | None = None,
) -> pb.CheckResponse:
    """Run a validated plan and encode its reports: what both a server thread and a worker do.

    Each report is encoded with what the service adds (its point, the replica, the function's
    label) and only the options the client set or the engine resolved, straight from the engine's
    Report: no copy of it in between."""
    reports = run_plan(
        plan,
        deadline=deadline,
        cancelled=cancelled,
        check_fn=check_fn,
        max_bytes=max_bytes,
        progress=progress,
    )
    # Options the server imposed (limits, its default device) stay out of the report, so a report
    # from the service equals the one the same call gives in-process; the step the engine resolved
    # ("eps", the numeric "reference") are figures of the check and stay. The whole response is
    # one constructor call (upb builds it), not a message filled field by field from Python.
    # (upb takes a nested message as a dict of its fields; the generated stubs only say messages.)
    fields: list[Any] = [
        report_fields(
            report,
            options=reported_options(report, plan.client_options),
            point=index,
            served_by=served_by,
            function=plan.label,
        )
        for index, report in enumerate(reports)
    ]
    return pb.CheckResponse(check_id=check_id, reports=fields)


def run_plan(
    plan: CheckPlan,
    *,
    deadline: Deadline,
    cancelled: Callable[[], bool],
    max_bytes: int,
    check_fn: CheckFn = gc.check,
    progress: PointProgress | None = None,
) -> list[Report]:
    """The engine's report for each point, in order (``execute`` adds the service's fields)."""
    reports = []
    if plan.build_fn is not None:  # a registered module, built here (in the worker when isolated)
        plan = replace(plan, fn=guarded(plan.build_fn, deadline, cancelled, max_bytes), build_fn=None)
    for index, point in enumerate(plan.points):
        if cancelled():
            raise CheckCancelledError("the client cancelled the check")
        if deadline.passed():
            raise deadline.rejection()
        extra = {} if progress is None else {"progress": functools.partial(progress, index)}
        reports.append(_guarded_point(plan, point, deadline, cancelled, check_fn, max_bytes, extra))
    return reports


def _guarded_point(
    plan: CheckPlan,
    point: PlannedPoint,
    deadline: Deadline,
    cancelled: Callable[[], bool],
    check_fn: CheckFn,
    max_bytes: int,
    extra: dict[str, Any],
) -> Report:
    def run() -> Report:
        return _run_point(plan, point, deadline, cancelled, check_fn, extra)

    if plan.light:  # small everywhere, sized up front: the engine's own polls bound it
        return run()
    return guarded(run, deadline, cancelled, max_bytes)


def guarded(run: Callable[[], _T], deadline: Deadline, cancelled: Callable[[], bool], max_bytes: int) -> _T:
    """``run()`` under a CheckGuard: a point's check, a registered module's constructor, or a
    CheckExternal check (the engine's arithmetic and the tensors decoded from the client's answers)."""
    guard = CheckGuard(max_bytes=max_bytes, deadline=deadline.at, cancelled=cancelled)
    result: _T | None = None
    try:
        with guard:
            result = run()
    except Exception:
        if guard.tripped is None:
            raise
    if guard.tripped is not None:  # whatever the function or the engine made of it
        if isinstance(guard.tripped, CheckCancelledError):
            raise CheckCancelledError("the client cancelled the check") from None
        if deadline.passed():
            raise deadline.rejection() from None
        raise guard.tripped from None
    assert result is not None
    return result


def _run_point(
    plan: CheckPlan,
    point: PlannedPoint,
    deadline: Deadline,
    cancelled: Callable[[], bool],
    check_fn: CheckFn,
    extra: dict[str, Any],
) -> Report:
    try:
        return check_fn(
            plan.fn,
            *point.tensors,
            input_names=point.names,
            fn_kwargs=plan.fn_kwargs or None,
            deadline=deadline.at,
            cancelled=cancelled,
            **extra,
            **plan.options,
        )
    except LimitExceededError:
        if deadline.passed():
            raise deadline.rejection() from None
        raise
    except _REQUEST_LEVEL:
        raise
    except (FunctionRaisedError, OutputTypeError) as exc:
        return _error_report(plan, point, str(exc))
    except GradcheckError:
        raise
    except Exception as exc:  # the client's function may raise anything; the server carries on
        return _error_report(plan, point, f"{type(exc).__name__}: {exc}")


def _error_report(plan: CheckPlan, point: PlannedPoint, message: str) -> Report:
    floats = [t for t in point.tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in floats})
    return Report(
        ok=False,
        error=message,
        dtype=",".join(dtypes),
        device=plan.device,
        function=plan.label,
        options={k: v for k, v in plan.options.items() if k in plan.client_options},
    )


# A random prefix per server process and a count: ids differ across replicas and restarts, and a
# new one costs no system call (a read of the OS's random source is one, on every check).
_ID_PREFIX = secrets.token_hex(3)
_ID_COUNT = itertools.count()


def new_check_id() -> str:
    """A check's id in logs and error messages: 12 hex digits (more after 16 million checks),
    unique within this process."""
    return f"{_ID_PREFIX}{next(_ID_COUNT):06x}"
