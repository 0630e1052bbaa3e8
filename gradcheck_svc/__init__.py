"""gradcheck-svc: check hand-written gradients against error-bounded finite differences.

    import torch, gradcheck_svc as gc
    report = gc.check(lambda x: x**2, torch.tensor(9.0))
    assert report.ok
    print(report)

The engine (and torch) is imported on first use of ``check`` / ``assert_grads``, so
``gradcheck_svc.errors`` or the CLI's ``health`` command stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradcheck_svc.errors import (
    BackwardNotDifferentiableError,
    BindingError,
    CheckCancelledError,
    CheckError,
    DeviceUnavailableError,
    FunctionRaisedError,
    GradcheckError,
    GradientMismatch,
    InvalidOptionError,
    InvalidRequestError,
    LimitExceededError,
    NotCallableError,
    NothingToCheckError,
    OutputTypeError,
    ServiceError,
    SpecError,
    UnknownFunctionError,
    UnsupportedTensorError,
)
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Check, ElementError, PairReport, Report, Status

if TYPE_CHECKING:
    from gradcheck_svc.engine.api import assert_grads, check

__version__ = "0.1.0"

__all__ = [
    "BackwardNotDifferentiableError",
    "BindingError",
    "Check",
    "CheckCancelledError",
    "CheckError",
    "CheckOptions",
    "DeviceUnavailableError",
    "ElementError",
    "FunctionRaisedError",
    "GradcheckError",
    "GradientMismatch",
    "InvalidOptionError",
    "InvalidRequestError",
    "LimitExceededError",
    "NotCallableError",
    "NothingToCheckError",
    "OutputTypeError",
    "PairReport",
    "Report",
    "ServiceError",
    "SpecError",
    "Status",
    "UnknownFunctionError",
    "UnsupportedTensorError",
    "__version__",
    "assert_grads",
    "check",
]


def __getattr__(name: str) -> Any:
    if name in ("check", "assert_grads"):
        from gradcheck_svc.engine import api

        value = getattr(api, name)
        globals()[name] = value  # imported once: later lookups skip this hook
        return value
    raise AttributeError(f"module 'gradcheck_svc' has no attribute {name!r}")
