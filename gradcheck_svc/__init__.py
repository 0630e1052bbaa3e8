"""gradcheck-svc: check hand-written gradients against error-bounded finite differences.

import torch, gradcheck_svc as gc
report = gc.check(lambda x: x**2, torch.tensor(9.0))
assert report.ok
print(report)
"""

from gradcheck_svc.engine.api import assert_grads, check
from gradcheck_svc.errors import (
    CheckCancelledError,
    CheckError,
    DeviceUnavailableError,
    FunctionRaisedError,
    GradcheckError,
    GradientMismatch,
    InvalidOptionError,
    LimitExceededError,
    NothingToCheckError,
    OutputTypeError,
    ServiceError,
    SpecError,
    UnknownFunctionError,
)
from gradcheck_svc.options import CheckOptions
from gradcheck_svc.report import Check, ElementError, PairReport, Report, Status

__version__ = "0.1.0"

__all__ = [
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
    "LimitExceededError",
    "NothingToCheckError",
    "OutputTypeError",
    "PairReport",
    "Report",
    "ServiceError",
    "SpecError",
    "Status",
    "UnknownFunctionError",
    "__version__",
    "assert_grads",
    "check",
]
