"""Operator code for the binding tests: what a server would register with ``--functions binding_ops``."""

from __future__ import annotations

import time

import torch

from gradcheck_svc.specs import FunctionRegistry

__all__ = ["Affine", "Hungry", "NoArgs", "Softmax", "Stuck", "power"]


def power(x: torch.Tensor, p: int = 2, *, scale: float = 1.0) -> torch.Tensor:
    return scale * x**p


class Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):  # type: ignore[no-untyped-def, override]
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        return y * (grad - (grad * y).sum(ctx.dim, keepdim=True)), None


class Affine(torch.nn.Module):
    def __init__(self, n: int, m: int, bias: bool = True) -> None:
        super().__init__()
        if n <= 0:
            raise ValueError("n must be positive")
        self.n, self.m, self.has_bias = n, m, bias
        self.linear = torch.nn.Linear(n, m, bias=bias)
        self.register_buffer("shift", torch.zeros(m))

    def gradcheck_init_args(self):  # type: ignore[no-untyped-def]
        from gradcheck_svc.binding import InitArgs

        return InitArgs(self.n, self.m, bias=self.has_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)) + self.shift


class NoArgs(torch.nn.Module):
    gradcheck_init_args = ()  # a plain value works too: no constructor arguments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp()


class Stuck(torch.nn.Module):
    """A constructor that never returns: the server must build modules where it can kill them."""

    def __init__(self) -> None:
        super().__init__()
        while True:
            time.sleep(0.01)

    def gradcheck_init_args(self):  # type: ignore[no-untyped-def]
        return ()


class Hungry(torch.nn.Module):
    """A constructor that allocates 64 MiB: over a small max_check_bytes, wherever it is built."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(8 * 2**20, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def gradcheck_init_args(self):  # type: ignore[no-untyped-def]
        return ()


def registry() -> FunctionRegistry:
    """What ``serve --functions binding_ops`` exposes (module-level: worker processes build it too)."""
    registry = FunctionRegistry.default(load_entry_points=False)
    registry.add_module("binding_ops")
    return registry
