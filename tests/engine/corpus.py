"""Correct custom autograd.Functions of the kinds people write, each with planted-bug twins.

Every Function takes a ``bug`` name as its last argument ("none" is the correct code). The bugs
are the classes seen in real hand-written backwards: a dropped factor in one term, a 1% error in
one term, a flipped sign, a transposed matrix, a missing broadcast reduction. ``CASES`` pairs each
Function with an input generator and its bug names; the verdict benchmark and the regression tests
share them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["CASES", "Case", "make_inputs", "only_in"]

_GELU_K = 0.79788456
_GELU_A = 0.044715


class TanhGelu(torch.autograd.Function):
    """gelu_tanh(x + b), b broadcast over rows."""

    @staticmethod
    def forward(ctx, x, b, bug):
        z = x + b
        ctx.save_for_backward(z)
        ctx.bug = bug
        return 0.5 * z * (1 + torch.tanh(_GELU_K * z * (1 + _GELU_A * z * z)))

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        t = torch.tanh(_GELU_K * z * (1 + _GELU_A * z * z))
        cubic = 2 if ctx.bug == "dropped_factor" else 3
        inner = _GELU_K * (1 + cubic * _GELU_A * z * z)
        second = 0.5 * z * (1 - t * t) * inner
        if ctx.bug == "one_percent":
            second = second * 1.01
        if ctx.bug == "sign":
            second = -second
        gz = grad * (0.5 * (1 + t) + second)
        gb = gz.mean(0) if ctx.bug == "broadcast" else gz.sum(0)
        return gz, gb, None


class Sparsemax(torch.autograd.Function):
    """Row-wise sparsemax (Martins & Astudillo) by sort and threshold."""

    @staticmethod
    def forward(ctx, x, bug):
        z, _ = torch.sort(x, dim=-1, descending=True)
        k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
        cumsum = z.cumsum(-1)
        support = 1 + k * z > cumsum
        k_max = support.sum(-1, keepdim=True)
        tau = (cumsum.gather(-1, k_max - 1) - 1) / k_max.to(x.dtype)
        y = torch.clamp(x - tau, min=0)
        ctx.save_for_backward(y)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        on = (y > 0).to(grad.dtype)
        mean = (grad * on).sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
        if ctx.bug == "one_percent":
            mean = mean * 1.01
        if ctx.bug == "dropped_factor":
            mean = mean * on.sum(-1, keepdim=True) / (on.sum(-1, keepdim=True) + 1)
        return on * (grad - mean), None


class Silu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        second = x * s * (1 - s)
        if ctx.bug == "dropped_factor":
            second = s * (1 - s)
        if ctx.bug == "one_percent":
            second = second * 1.01
        return grad * (s + second), None


class Softplus(torch.autograd.Function):
    """log(1 + exp(x)), computed stably."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.clamp(x, min=0) + torch.log1p(torch.exp(-x.abs()))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        if ctx.bug == "one_percent":
            s = s * 1.01
        if ctx.bug == "sign":
            s = torch.sigmoid(-x)
        return grad * s, None


class Softmax(torch.autograd.Function):
    """Row-wise softmax."""

    @staticmethod
    def forward(ctx, x, bug):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        dot = (grad * y).sum(-1, keepdim=True)
        if ctx.bug == "one_percent":
            dot = dot * 1.01
        if ctx.bug == "dropped_factor":
            return grad - dot, None  # forgot the leading y
        return y * (grad - dot), None


class LogSumExp(torch.autograd.Function):
    """Row-wise logsumexp."""

    @staticmethod
    def forward(ctx, x, bug):
        m = x.max(-1, keepdim=True).values
        y = m.squeeze(-1) + torch.log(torch.exp(x - m).sum(-1))
        ctx.save_for_backward(x, y)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        p = torch.exp(x - y.unsqueeze(-1))
        if ctx.bug == "one_percent":
            p = p * 1.01
        return grad.unsqueeze(-1) * p, None


class RowNorm(torch.autograd.Function):
    """Layer-norm-like: (x - mean) / sqrt(var + eps) per row, then * w."""

    @staticmethod
    def forward(ctx, x, w, bug):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + 1e-5)
        xhat = xc * rstd
        ctx.save_for_backward(xhat, rstd, w)
        ctx.bug = bug
        return xhat * w

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, w = ctx.saved_tensors
        g = grad * w
        proj = (g * xhat).mean(-1, keepdim=True)
        if ctx.bug == "one_percent":
            proj = proj * 1.01
        if ctx.bug == "dropped_factor":
            proj = proj * 0  # forgot the variance term
        gx = rstd * (g - g.mean(-1, keepdim=True) - xhat * proj)
        gw = (grad * xhat).mean(0) if ctx.bug == "broadcast" else (grad * xhat).sum(0)
        return gx, gw, None


class SoftClip(torch.autograd.Function):
    """Smooth clip c * tanh(x / c) followed by a soft threshold x - tanh(x)."""

    @staticmethod
    def forward(ctx, x, bug):
        c = 3.0
        clipped = c * torch.tanh(x / c)
        ctx.save_for_backward(x)
        ctx.bug = bug
        return clipped - torch.tanh(clipped)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        c = 3.0
        tc = torch.tanh(x / c)
        dclip = 1 - tc * tc
        t = torch.tanh(c * tc)
        outer = 1 - (1 - t * t)
        if ctx.bug == "one_percent":
            outer = 1 - 1.01 * (1 - t * t)
        if ctx.bug == "sign":
            outer = 1 + (1 - t * t)
        return grad * outer * dclip, None


class LinearTanh(torch.autograd.Function):
    """tanh(x @ w.T + b)."""

    @staticmethod
    def forward(ctx, x, w, b, bug):
        y = torch.tanh(x @ w.T + b)
        ctx.save_for_backward(x, w, y)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, y = ctx.saved_tensors
        gz = grad * (1 - y * y)
        if ctx.bug == "one_percent":
            gz = gz * torch.where(torch.arange(gz.shape[-1], device=gz.device) == 0, 1.01, 1.0).to(gz.dtype)
        gx = gz @ (w.T if ctx.bug == "transposed" else w)
        gw = gz.T @ x
        gb = gz.mean(0) if ctx.bug == "broadcast" else gz.sum(0)
        return gx, gw, gb, None


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[..., torch.Tensor]  # fn(*inputs, bug)
    inputs: Callable[[torch.Generator, tuple[int, int]], tuple[torch.Tensor, ...]]  # float64
    bugs: tuple[str, ...]

    def bound(self, bug: str = "none") -> Callable[..., torch.Tensor]:
        fn = self.fn

        def call(*inputs: torch.Tensor) -> torch.Tensor:
            return fn(*inputs, bug)

        call.__name__ = call.__qualname__ = self.name if bug == "none" else f"{self.name}[{bug}]"
        return call


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


CASES: tuple[Case, ...] = (
    Case(
        "tanh_gelu",
        TanhGelu.apply,
        lambda g, s: (_randn(g, *s, scale=2.0), _randn(g, s[1])),
        ("dropped_factor", "one_percent", "sign", "broadcast"),
    ),
    Case("sparsemax", Sparsemax.apply, lambda g, s: (_randn(g, *s),), ("one_percent", "dropped_factor")),
    Case("silu", Silu.apply, lambda g, s: (_randn(g, *s, scale=3.0),), ("dropped_factor", "one_percent")),
    Case("softplus", Softplus.apply, lambda g, s: (_randn(g, *s, scale=4.0),), ("one_percent", "sign")),
    Case(
        "softmax", Softmax.apply, lambda g, s: (_randn(g, *s, scale=2.0),), ("one_percent", "dropped_factor")
    ),
    Case("logsumexp", LogSumExp.apply, lambda g, s: (_randn(g, *s, scale=2.0),), ("one_percent",)),
    Case(
        "row_norm",
        RowNorm.apply,
        lambda g, s: (_randn(g, *s, scale=3.0) + 1, _randn(g, s[1])),
        ("one_percent", "dropped_factor", "broadcast"),
    ),
    Case("soft_clip", SoftClip.apply, lambda g, s: (_randn(g, *s, scale=3.0),), ("one_percent", "sign")),
    Case(
        "linear_tanh",
        LinearTanh.apply,
        lambda g, s: (
            _randn(g, *s),
            _randn(g, s[1], s[1], scale=1 / math.sqrt(s[1])),
            _randn(g, s[1], scale=0.1),
        ),
        ("transposed", "one_percent", "broadcast"),
    ),
)


def make_inputs(case: Case, seed: int, dtype: torch.dtype, shape: tuple[int, int] = (6, 5)) -> tuple:
    """The case's inputs for ``seed``, drawn in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(t.to(dtype) for t in case.inputs(g, shape))


def only_in(dtype: torch.dtype, fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` refusing floating inputs of any other dtype, as code written for one dtype (a float32
    constant inside) does: its finite differences then stay in ``dtype`` (``--own-dtype``)."""

    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128

    def call(*inputs: torch.Tensor) -> object:
        if any(
            (t.is_floating_point() and t.dtype != dtype) or (t.is_complex() and t.dtype != complex_dtype)
            for t in inputs
        ):
            raise TypeError(f"written for {dtype} inputs only")
        return fn(*inputs)

    call.__name__ = call.__qualname__ = getattr(fn, "__name__", "fn")
    return call
