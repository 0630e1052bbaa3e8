"""Functions the test servers expose with ``--functions service_test_ops`` (an operator's module).

``calls`` counts evaluations of ``slow_square`` so tests can see that cancelled work stops.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["BadBackward", "calls", "raises_when_negative", "reset", "returns_text", "slow_square"]

calls = {"slow_square": 0}


def reset() -> None:
    calls["slow_square"] = 0


def slow_square(x: torch.Tensor, delay: float = 0.05) -> torch.Tensor:
    """x**2 that takes ``delay`` seconds per evaluation (checked with chunk_size=1: many chunks)."""
    calls["slow_square"] += 1
    time.sleep(delay)
    return x * x


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
