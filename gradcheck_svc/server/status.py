"""Exceptions -> gRPC status codes with google.rpc error details (AIP-193).

One table decides the code of every error a check can end with, for unary calls (the call's
status) and for CheckStream items (a google.rpc.Status inside the answer) alike. Every status
carries a ``google.rpc.ErrorInfo`` with a stable ``reason`` (the list is in the proto's comments),
domain ``gradcheck-svc`` and metadata naming the limit and its value where one applies; field
problems add ``BadRequest``, limits ``QuotaFailure``, a busy or draining server ``RetryInfo``, a
missing device ``PreconditionFailure``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from gradcheck_svc.errors import (
    CheckCancelledError,
    DeviceUnavailableError,
    InvalidOptionError,
    InvalidRequestError,
    LimitExceededError,
    NothingToCheckError,
    SpecError,
    UnknownFunctionError,
)

__all__ = [
    "DOMAIN",
    "Rejection",
    "RpcFailure",
    "failure_for",
    "limit_of",
    "reason_of",
    "rejection_from_status",
]

log = logging.getLogger("gradcheck_svc.server")
DOMAIN = "gradcheck-svc"
_LIMIT_IN_MESSAGE = re.compile(r"\b(max_[a-z_]+)=([^\s),;]+)")
# The engine names its limits in words; these map them to the option that sets them.
_ENGINE_LIMITS = (("Jacobian entries", "max_jacobian_entries"), ("function evaluations", "max_evaluations"))


class Rejection(Exception):
    """Raised by the server itself (busy, draining, deadline, a worker's answer) with the code to send."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: list[tuple[str, str]] | None = None,
        *,
        reason: str = "",
        limit: tuple[str, str] | None = None,
        retry_after: float | None = None,
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations or []
        self.reason = reason or _default_reason(code)
        self.limit = limit
        self.retry_after = retry_after
        self.status = status  # a worker's status, passed on as it came


def _default_reason(code: grpc.StatusCode) -> str:
    return {
        grpc.StatusCode.UNAVAILABLE: "SERVER_DRAINING",
        grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
        grpc.StatusCode.CANCELLED: "CANCELLED",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "LIMIT_EXCEEDED",
        grpc.StatusCode.INVALID_ARGUMENT: "REQUEST_INVALID",
        grpc.StatusCode.UNAUTHENTICATED: "TOKEN_INVALID",
    }.get(code, "INTERNAL")


def _pack(detail: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


@dataclass(frozen=True)
class RpcFailure:
    """What the client is told: a status code, a message, a reason and the details that go with it."""

    code: grpc.StatusCode
    message: str
    reason: str
    violations: list[tuple[str, str]] = field(default_factory=list)
    limit: tuple[str, str] | None = None  # (setting, value) of the limit that was hit
    retry_after: float | None = None
    precondition: tuple[str, str, str] | None = None  # (type, subject, description)
    passed_on: status_pb2.Status | None = None

    def to_status(self) -> status_pb2.Status:
        """As a google.rpc.Status (for grpc_status.rpc_status.to_status and CheckStream answers)."""
        if self.passed_on is not None:
            return self.passed_on
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        metadata = {"limit": self.limit[0], "value": self.limit[1]} if self.limit else {}
        status.details.append(
            _pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata))
        )
        if self.violations:
            status.details.append(
                _pack(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                            for f, d in self.violations
                        ]
                    )
                )
            )
        if self.limit:
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=self.limit[0], description=f"{self.limit[0]}={self.limit[1]}: {self.message}"
            )
            status.details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after * 1e9))
            status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        if self.precondition:
            kind, subject, description = self.precondition
            violation = error_details_pb2.PreconditionFailure.Violation(
                type=kind, subject=subject, description=description
            )
            status.details.append(_pack(error_details_pb2.PreconditionFailure(violations=[violation])))
        return status


def limit_of(exc: BaseException) -> tuple[str, str] | None:
    """The setting a LimitExceededError's message names, with its value."""
    text = str(exc)
    found = _LIMIT_IN_MESSAGE.search(text)
    if found:
        return found.group(1), found.group(2)
    for words, name in _ENGINE_LIMITS:
        if words in text:
            value = re.search(r"limit of (\d+)", text)
            return name, value.group(1) if value else ""
    return None


def failure_for(exc: BaseException, check_id: str = "", *, quiet: bool = False) -> RpcFailure:
    """The status for an exception that ends a whole request.

    An internal error is logged with its traceback unless ``quiet``: a caller that only wants the
    status's name, before the exception reaches the handler that answers with it, passes ``quiet``
    so that the error is logged once.
    """
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, Rejection):
        return RpcFailure(
            exc.code,
            exc.message,
            exc.reason,
            exc.violations,
            exc.limit,
            exc.retry_after,
            passed_on=exc.status,
        )
    if isinstance(exc, InvalidRequestError):
        reason = "EXPRESSION_INVALID" if exc.field.startswith("function") else "REQUEST_INVALID"
        return RpcFailure(bad, str(exc), reason, [(exc.field, exc.description)])
    if isinstance(exc, UnknownFunctionError):
        return RpcFailure(
            grpc.StatusCode.NOT_FOUND,
            str(exc),
            "FUNCTION_NOT_FOUND",
            [("function.registered.name", str(exc))],
        )
    if isinstance(exc, SpecError):
        return RpcFailure(bad, str(exc), "EXPRESSION_INVALID", [("function", str(exc))])
    if isinstance(exc, InvalidOptionError):
        return RpcFailure(bad, str(exc), "OPTION_INVALID", [("options", str(exc))])
    if isinstance(exc, NothingToCheckError):
        return RpcFailure(bad, str(exc), "NOTHING_TO_CHECK", [("points", str(exc))])
    if isinstance(exc, LimitExceededError):
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "LIMIT_EXCEEDED", limit=limit_of(exc))
    if isinstance(exc, DeviceUnavailableError):
        return RpcFailure(
            grpc.StatusCode.FAILED_PRECONDITION,
            str(exc),
            "DEVICE_UNAVAILABLE",
            precondition=("DEVICE", "cuda", str(exc)),
        )
    if isinstance(exc, CheckCancelledError):
        return RpcFailure(grpc.StatusCode.CANCELLED, str(exc) or "check cancelled", "CANCELLED")
    if not quiet:
        log.error("check %s failed with an internal error", check_id, exc_info=exc)
    return RpcFailure(
        grpc.StatusCode.INTERNAL, f"internal error in check {check_id}: {type(exc).__name__}", "INTERNAL"
    )


def rejection_from_status(status: status_pb2.Status) -> Rejection:
    """The inverse of ``RpcFailure.to_status``: a worker process's failure, re-raised in the server."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return Rejection(code, status.message, reason=reason_of(status), status=status)


def reason_of(status: status_pb2.Status) -> str:
    """The ErrorInfo reason of a google.rpc.Status ("" when it has none)."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


# The numeric values of grpc.StatusCode and google.rpc.Code agree; keep an eye on one of them.
assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
