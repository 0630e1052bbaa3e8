"""Functions the plugin tests' server registers (as ``plugin_sample_ops:<name>``).

User test files import them too, so the plugin can send them to the server by name.
"""

from __future__ import annotations

import torch

__all__ = ["BadCube", "scaled_sine"]


def scaled_sine(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x / 2**1.5)


class BadCube(torch.autograd.Function):
    """x**3 with a planted bug in its backward (3x instead of 3x**2)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        return grad * 3 * x
