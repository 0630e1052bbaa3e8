"""Functions the plugin tests' server registers (as ``plugin_sample_ops:<name>``).

User test files import them too, so the plugin can send them to the server by name. The shapes
are the ones real suites use: autograd.Functions taking ``dim`` positionally, functions taking
constant keywords, and an nn.Module built from constructor arguments.
"""

from __future__ import annotations

import torch

__all__ = [
    "BadCube",
    "Bilinear",
    "LogSumExp",
    "ScaledSoftmax",
    "Unregistered",
    "cast_sine",
    "leaky",
    "scaled_sine",
]


def scaled_sine(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x / 2**1.5)


def cast_sine(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Takes a torch.dtype, a value no wire format carries."""
    return torch.sin(x.to(dtype))


def leaky(x: torch.Tensor, alpha: float = 0.1, *, mode: str = "plain") -> torch.Tensor:
    """A smooth leaky activation with constant keywords (``alpha``, ``mode``)."""
    y = torch.where(x > 0, x, alpha * x) + 0.1 * torch.tanh(x)
    return y * 2 if mode == "double" else y


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


class LogSumExp(torch.autograd.Function):
    """logsumexp over ``dim`` (a positional int) with ``keepdim`` (a positional bool)."""

    @staticmethod
    def forward(ctx, x, dim, keepdim):  # type: ignore[no-untyped-def, override]
        out = torch.logsumexp(x, dim, keepdim=True)
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out if keepdim else out.squeeze(dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        x, out = ctx.saved_tensors
        if grad.dim() < x.dim():
            grad = grad.unsqueeze(ctx.dim)
        return grad * torch.exp(x - out), None, None


class ScaledSoftmax(torch.autograd.Function):
    """softmax(x * scale) over ``dim``: ``dims`` is a tuple of (dim,) to exercise tuples."""

    @staticmethod
    def forward(ctx, x, dims, scale):  # type: ignore[no-untyped-def, override]
        (dim,) = dims
        y = torch.softmax(x * scale, dim)
        ctx.save_for_backward(y)
        ctx.dim, ctx.scale = dim, scale
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        (y,) = ctx.saved_tensors
        inner = (grad * y).sum(ctx.dim, keepdim=True)
        return ctx.scale * y * (grad - inner), None, None


class Bilinear(torch.nn.Module):
    """x^T W y + b over ``features``, with a buffer; rebuilt on a server from its constructor arguments."""

    def __init__(self, features: int, out: int = 2, *, bias: bool = True) -> None:
        super().__init__()
        self.features, self.out, self.with_bias = features, out, bias
        self.weight = torch.nn.Parameter(torch.randn(out, features, features))
        self.bias = torch.nn.Parameter(torch.randn(out)) if bias else None
        self.register_buffer("scale", torch.tensor(0.5))

    def gradcheck_init_args(self) -> dict[str, object]:
        return {"features": self.features, "out": self.out, "bias": self.with_bias}

    def forward(self, x: torch.Tensor, y: torch.Tensor, power: int = 1) -> torch.Tensor:
        z = torch.einsum("i,oij,j->o", x, self.weight, y) * self.scale
        z = z if self.bias is None else z + self.bias
        return z**power


class Unregistered(torch.nn.Module):
    """A module without gradcheck_init_args: it cannot travel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sin()
