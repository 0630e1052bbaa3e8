"""Piecewise custom Functions on random inputs, each correct and with planted-bug twins.

The kink-prone layers people write by hand: relu, leaky relu, hardtanh and abs as elementwise
Functions, a two-layer relu MLP with its whole backward written out, and a 2x2 max pool. Their
inputs are random normal, as in a real model, so at a few thousand elements some lie within a
finite-difference step of a corner by chance. The cases are ``WildCase``s, so ``bench_wild.py``
(``--corpus kinky``) measures them beside the other custom Functions; at ``--shapes large`` the
default options check them in fast mode.
"""

from __future__ import annotations

import torch
from corpus_wild import WildCase, _one_element, _randn

__all__ = ["KINKY_CASES"]


class Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        mask = x < 0 if ctx.bug == "inverted_mask" else x > 0
        gx = g * mask.to(g.dtype)
        if ctx.bug == "one_percent_element":
            gx = _one_element(gx, 1.01)
        if ctx.bug == "one_percent_all":
            gx = gx * 1.01
        return gx, None


class LeakyRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.where(x > 0, x, 0.01 * x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        slope = {"wrong_slope": 0.02, "dropped_slope": 0.0}.get(ctx.bug, 0.01)
        gx = g * torch.where(x > 0, 1.0, slope).to(g.dtype)
        if ctx.bug == "one_percent_element":
            gx = _one_element(gx, 1.01)
        return gx, None


class Hardtanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # upper_only: the lower bound forgotten in the mask
        inside = x < 1.0 if ctx.bug == "upper_only" else (x > -1.0) & (x < 1.0)
        gx = g * inside.to(g.dtype)
        if ctx.bug == "one_percent_element":
            gx = _one_element(gx, 1.01)
        return gx, None


class Abs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x.abs()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gx = g * x.sign()
        if ctx.bug == "one_percent_element":
            gx = _one_element(gx, 1.01)
        if ctx.bug == "one_percent_negative":  # 1% off on the negative side only
            gx = torch.where(x < 0, gx * 1.01, gx)
        return gx, None


class ReluMlp(torch.autograd.Function):
    """relu(x W1^T + b1) W2^T + b2 with the backward written out."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, bug):
        z = x @ w1.T + b1
        h = z.clamp(min=0)
        ctx.save_for_backward(x, w1, w2, z, h)
        ctx.bug = bug
        return h @ w2.T

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, z, h = ctx.saved_tensors
        bug = ctx.bug
        gw2 = g.T @ h
        gh = g @ (w2.T if bug == "transposed_w2" else w2)
        gz = gh if bug == "missing_mask" else gh * (z > 0).to(gh.dtype)
        gw1 = gz.T @ x
        if bug == "one_percent_element":
            gw1 = _one_element(gw1, 1.01)
        gb1 = gz.sum(0)
        if bug == "bias_mean":
            gb1 = gz.mean(0)
        return gz @ w1, gw1, gb1, gw2, None


class MaxPool2x2(torch.autograd.Function):
    """2x2 max pooling of an (H, W) map with stride 2, by unfolding the windows."""

    @staticmethod
    def forward(ctx, x, bug):
        h, w = x.shape
        windows = x.reshape(h // 2, 2, w // 2, 2).permute(0, 2, 1, 3).reshape(h // 2, w // 2, 4)
        out, arg = windows.max(-1)
        ctx.save_for_backward(arg)
        ctx.shape, ctx.bug = x.shape, bug
        return out

    @staticmethod
    def backward(ctx, g):
        (arg,) = ctx.saved_tensors
        h, w = ctx.shape
        if ctx.bug == "first_in_window":
            arg = torch.zeros_like(arg)
        if ctx.bug == "one_percent_element":
            g = _one_element(g, 1.01)
        grads = torch.zeros(h // 2, w // 2, 4, dtype=g.dtype, device=g.device)
        grads.scatter_(-1, arg.unsqueeze(-1), g.unsqueeze(-1))
        return grads.reshape(h // 2, w // 2, 2, 2).permute(0, 2, 1, 3).reshape(h, w), None


def _mlp_inputs(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    rows, width = s
    return (
        _randn(g, rows, width),
        _randn(g, width, width, scale=width**-0.5),
        _randn(g, width, scale=0.1),
        _randn(g, width, width, scale=width**-0.5),
    )


def _even(g: torch.Generator, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    return (_randn(g, s[0] + s[0] % 2, s[1] + s[1] % 2),)


KINKY_CASES: tuple[WildCase, ...] = (
    WildCase(
        "relu",
        Relu.apply,
        lambda g, s: (_randn(g, *s),),
        ("inverted_mask", "one_percent_element", "one_percent_all"),
    ),
    WildCase(
        "leaky_relu",
        LeakyRelu.apply,
        lambda g, s: (_randn(g, *s),),
        ("wrong_slope", "dropped_slope", "one_percent_element"),
    ),
    WildCase(
        "hardtanh",
        Hardtanh.apply,
        lambda g, s: (_randn(g, *s, scale=1.5),),
        ("upper_only", "one_percent_element"),
    ),
    WildCase(
        "abs", Abs.apply, lambda g, s: (_randn(g, *s),), ("one_percent_element", "one_percent_negative")
    ),
    WildCase(
        "relu_mlp",
        ReluMlp.apply,
        _mlp_inputs,
        ("missing_mask", "transposed_w2", "one_percent_element", "bias_mean"),
    ),
    WildCase("maxpool2x2", MaxPool2x2.apply, _even, ("first_in_window", "one_percent_element")),
)
