"""Functions the test servers expose with ``--functions service_test_ops`` (an operator's module).

``calls`` counts evaluations of ``slow_square`` so tests can see that cancelled work stops. The
count lives in a file named by $GRADCHECK_TEST_CALLS, so evaluations in a server's worker processes
count too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BadBackward",
    "calls",
    "crashes",
    "never_returns",
    "raises_when_negative",
    "reset",
    "returns_text",
    "slow_square",
    "tells_torch_threads",
]

CALLS_ENV = "GRADCHECK_TEST_CALLS"


class _Calls:
    """``calls["slow_square"]``: evaluations so far, one byte each in the counter file."""

    def __getitem__(self, name: str) -> int:
        path = os.environ.get(CALLS_ENV)
        return Path(path).stat().st_size if path and Path(path).exists() else 0


calls = _Calls()


def reset() -> None:
    if path := os.environ.get(CALLS_ENV):
        Path(path).write_bytes(b"")


def _count() -> None:
    if path := os.environ.get(CALLS_ENV):
        with open(path, "ab") as f:
            f.write(b".")


def slow_square(x: torch.Tensor, delay: float = 0.05) -> torch.Tensor:
    """x**2 plus a small coupling term, taking ``delay`` seconds per evaluation.

    The coupling makes the Jacobian dense, so full mode perturbs it column by column (with
    chunk_size=1: one slow evaluation per column) instead of grouping an elementwise function.
    """
    _count()
    time.sleep(delay)
    return x * x + 1e-3 * (x.sum() - x)


def tells_torch_threads(x: torch.Tensor) -> torch.Tensor:
    """Fails with torch's thread count in the process (and thread) that called it, so a test sees
    the count a server's check starts with."""
    raise RuntimeError(f"torch threads here: {torch.get_num_threads()}")


def never_returns(x: torch.Tensor) -> torch.Tensor:
    """A function stuck in a loop that no deadline check inside the engine can interrupt."""
    while True:
        _count()
        time.sleep(0.05)


def crashes(x: torch.Tensor) -> torch.Tensor:
    """A function that takes its whole process down (a segfaulting kernel, say)."""
    os._exit(3)


def raises_when_negative(x: torch.Tensor) -> torch.Tensor:
    if bool((x < 0).any()):
        raise ValueError("negative input")
    return torch.sqrt(x)


def returns_text(x: torch.Tensor) -> Any:
    return "not a tensor"


class BadBackward(torch.autograd.Function):
    """x**2 with a backward that is off by a factor of 1.5 (a planted gradient bug)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * 3 * x
