"""The exception tree of gradcheck-svc, in one place.

    GradcheckError                         root: catch this to catch everything we raise
    ├── CheckError                         the check could not run as asked
    │   ├── InvalidOptionError             (also ValueError) an option has a wrong name or value
    │   ├── NotCallableError               (also TypeError)  fn is not callable
    │   ├── NothingToCheckError            (also TypeError)  no differentiable input or output
    │   ├── OutputTypeError                (also TypeError)  fn returned something that is not a tensor
    │   ├── UnsupportedTensorError         (also TypeError)  a sparse or otherwise non-strided tensor
    │   ├── FunctionRaisedError            (also ValueError) fn (or its backward) raised at this point
    │   ├── BackwardNotDifferentiableError (also TypeError)  the backward cannot itself be differentiated
    │   ├── DeviceUnavailableError         (also RuntimeError) e.g. device="cuda" without CUDA
    │   ├── CheckCancelledError            the caller cancelled the check between chunks
    │   └── LimitExceededError             (also ValueError) the check would exceed a configured limit
    ├── SpecError                          (also ValueError) a function spec a client sent is not acceptable
    │   └── UnknownFunctionError           (also LookupError) no registered function by that name
    ├── InvalidRequestError                (also ValueError) a malformed request; .field names where
    ├── BindingError                       (also TypeError)  a function and its arguments do not make a call
    ├── ServiceError                       a remote check failed on the wire or on the server
    └── GradientMismatch                   (also AssertionError) gradients disagree; carries the Report

User-facing errors also subclass the builtin a user would naturally catch, so
``except ValueError`` keeps working for code that does not know this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradcheck_svc.report import Report

__all__ = [
    "BackwardNotDifferentiableError",
    "BindingError",
    "CheckCancelledError",
    "CheckError",
    "DeviceUnavailableError",
    "FunctionRaisedError",
    "GradcheckError",
    "GradientMismatch",
    "InvalidOptionError",
    "InvalidRequestError",
    "LimitExceededError",
    "NotCallableError",
    "NothingToCheckError",
    "OutputTypeError",
    "ServiceError",
    "SpecError",
    "UnknownFunctionError",
    "UnsupportedTensorError",
]


class GradcheckError(Exception):
    """Root of every exception raised by gradcheck-svc."""


class CheckError(GradcheckError):
    """The check could not be carried out as asked."""


class InvalidOptionError(CheckError, ValueError):
    """An option has an unknown name or a value out of range."""


class NotCallableError(CheckError, TypeError):
    """fn is not callable."""


class NothingToCheckError(CheckError, TypeError):
    """No floating or complex input (or output) to differentiate."""


class OutputTypeError(CheckError, TypeError):
    """The function returned something other than tensors."""


class UnsupportedTensorError(CheckError, TypeError):
    """An input or output tensor has a layout finite differences cannot perturb (sparse, ...)."""


class FunctionRaisedError(CheckError, ValueError):
    """The function (or its backward) raised while being checked."""


class BackwardNotDifferentiableError(CheckError, TypeError):
    """The backward cannot itself be differentiated (needed for streamed columns and order 2)."""


class DeviceUnavailableError(CheckError, RuntimeError):
    """The requested device is not available on this machine."""


class CheckCancelledError(CheckError):
    """The caller cancelled the check (polled between finite-difference chunks)."""


class LimitExceededError(CheckError, ValueError):
    """The check would exceed a configured size or time limit."""


class SpecError(GradcheckError, ValueError):
    """A function spec (expression or registered name) is not acceptable."""


class UnknownFunctionError(SpecError, LookupError):
    """No registered function has that name."""


class ServiceError(GradcheckError):
    """A remote check failed: transport error or an error status from the server.

    ``code`` is the gRPC status code name (e.g. ``"INVALID_ARGUMENT"``) when known; ``reason`` the
    server's stable google.rpc.ErrorInfo reason (e.g. ``"LIMIT_EXCEEDED"``, ``"SERVER_BUSY"``), or
    None when the status carried none; ``metadata`` its ErrorInfo metadata (the limit and its value);
    ``retry_after`` the seconds its google.rpc.RetryInfo asked the client to wait, if any.
    """

    def __init__(
        self,
        message: str,
        code: str | None = None,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_after: float | None = None


class GradientMismatch(GradcheckError, AssertionError):
    """Analytic and numeric gradients disagree. ``str()`` is the readable report."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


class InvalidRequestError(GradcheckError, ValueError):
    """A request a client sent is malformed (bad tensor, missing input, ...).

    ``field`` is the path of the offending field, e.g. ``"points[0].tensors[1].shape"``.
    """

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}" if field else description)
        self.field = field
        self.description = description


class BindingError(GradcheckError, TypeError):
    """A function and the arguments given for it do not make one call: wrong count, unknown name,
    an input missing or given twice, a module that cannot be rebuilt.

    ``position`` is the index of the offending named input, when one input is at fault.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position
