"""Exceptions -> gRPC status codes, with google.rpc.BadRequest details for field-level problems.

One table decides the code of every error a check can end with, for unary calls (the call's
status) and for CheckStream items (a google.rpc.Status inside the answer) alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
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

__all__ = ["Rejection", "RpcFailure", "failure_for", "rejection_from_status"]

log = logging.getLogger("gradcheck_svc.server")


class Rejection(Exception):
    """Raised by the server itself (busy, draining, deadline, a worker's answer) with the code to send."""

    def __init__(
        self, code: grpc.StatusCode, message: str, violations: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = violations or []


@dataclass(frozen=True)
class RpcFailure:
    """What the client is told: a status code, a message and optional field violations."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)

    def to_status(self) -> status_pb2.Status:
        """As a google.rpc.Status (for grpc_status.rpc_status.to_status and CheckStream answers)."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
            detail = any_pb2.Any()
            detail.Pack(bad)
            status.details.append(detail)
        return status


def failure_for(exc: BaseException, check_id: str = "") -> RpcFailure:
    """The status for an exception that ends a whole request."""
    if isinstance(exc, Rejection):
        return RpcFailure(exc.code, exc.message, exc.violations)
    if isinstance(exc, InvalidRequestError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), [(exc.field, exc.description)])
    if isinstance(exc, UnknownFunctionError):
        return RpcFailure(grpc.StatusCode.NOT_FOUND, str(exc), [("function.registered.name", str(exc))])
    if isinstance(exc, SpecError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), [("function", str(exc))])
    if isinstance(exc, InvalidOptionError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), [("options", str(exc))])
    if isinstance(exc, NothingToCheckError):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), [("points", str(exc))])
    if isinstance(exc, LimitExceededError):
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, DeviceUnavailableError):
        return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, CheckCancelledError):
        return RpcFailure(grpc.StatusCode.CANCELLED, str(exc) or "check cancelled")
    log.error("check %s failed with an internal error", check_id, exc_info=exc)
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal error in check {check_id}: {type(exc).__name__}")


def rejection_from_status(status: status_pb2.Status) -> Rejection:
    """The inverse of ``RpcFailure.to_status``: a worker process's failure, re-raised in the server."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    violations = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations += [(v.field, v.description) for v in bad.field_violations]
    return Rejection(code, status.message, violations)


# The numeric values of grpc.StatusCode and google.rpc.Code agree; keep an eye on one of them.
assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
