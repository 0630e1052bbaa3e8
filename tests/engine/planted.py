"""Custom autograd.Functions with planted gradient bugs, and their correct twins."""

from __future__ import annotations

import torch


class Square(torch.autograd.Function):
    """x**2 with a configurable backward bug."""

    @staticmethod
    def forward(ctx, x, bug="none"):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        g = 2 * x * grad
        if ctx.bug == "sign":
            g = -g
        elif ctx.bug == "factor":  # forgot the 2
            g = x * grad
        elif ctx.bug == "scale1pct":
            g = g * 1.01
        elif ctx.bug == "scale1e-6":
            g = g * (1 + 1e-6)
        elif ctx.bug == "negative_only":
            g = torch.where(x < 0, -g, g)
        elif ctx.bug == "drop_one":
            g = g.clone()
            g.view(-1)[1] = 0
        return g, None


class MatVec(torch.autograd.Function):
    """W @ x with a transposed-matrix bug in the backward of x."""

    @staticmethod
    def forward(ctx, w, x, transposed_bug=False):
        ctx.save_for_backward(w, x)
        ctx.bug = transposed_bug
        return w @ x

    @staticmethod
    def backward(ctx, grad):
        w, x = ctx.saved_tensors
        grad_x = (w if ctx.bug else w.T) @ grad
        return torch.outer(grad, x), grad_x, None


class AddBias(torch.autograd.Function):
    """x + b (b broadcast over rows) with a wrong reduction of the bias gradient."""

    @staticmethod
    def forward(ctx, x, b, bug=False):
        ctx.bug = bug
        return x + b

    @staticmethod
    def backward(ctx, grad):
        grad_b = grad.mean(0) if ctx.bug else grad.sum(0)
        return grad, grad_b, None


class Mul(torch.autograd.Function):
    """x * y with a bug in the gradient of the second input only."""

    @staticmethod
    def forward(ctx, x, y, bug=False):
        ctx.save_for_backward(x, y)
        ctx.bug = bug
        return x * y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        grad_y = grad * x * (1.5 if ctx.bug else 1.0)
        return grad * y, grad_y, None


class NoisyDenseBackward(torch.autograd.Function):
    """tanh(W x) whose backward adds noise below every error bar: only its re-run can tell."""

    @staticmethod
    def forward(ctx, x, w):
        y = torch.tanh(w @ x)
        ctx.save_for_backward(y, w)
        return y

    @staticmethod
    def backward(ctx, g):
        y, w = ctx.saved_tensors
        grad = ((g * (1 - y * y)) @ w) + 1e-13 * torch.rand_like(g @ w)
        return grad, None


# The three seed examples as (fn, values at the point, expected derivatives).
SEED_EXAMPLES = [
    (lambda x: x**2, (9.0,), [18.0]),
    (lambda x: torch.sin(x / 2**1.5), (100.0,), [-0.2469]),
    (lambda u, v: u * v + u**2 + v**3, (2.0, 4.0), [8.0, 50.0]),
]
