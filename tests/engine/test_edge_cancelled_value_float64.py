"""Outputs that are themselves a cancellation, in float64: f is float64 rounding of terms of size
about 1, so its true derivative is 0 or tiny.

The finite differences of such an f carry that rounding over the step (about 1e-11), which their
error bars miss (power-of-two steps scale the rounding with the step) and the block's scale (about
0) does not allow, so correct code failed. float64 has no wider reference; a float32 copy of fn
measures the size of the terms, and the differences are allowed their rounding at that size,
never more: a backward that gets the cancelling derivative wrong is still caught.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradcheck_svc as gc
from gradcheck_svc.engine.problem import build_problem
from gradcheck_svc.engine.reference import narrowed_terms
from gradcheck_svc.report import Status

MODES = ["full", "fast", "auto"]
SEEDS = range(10)


def _x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _batch_norm_sum(x):
    return F.batch_norm(x, None, None, training=True).sum(0)


def _product(x):
    return (x - x.mean()).sum() * x.sum()


class BatchNorm(torch.autograd.Function):
    """Batch normalisation over dim 0 with a hand-written backward; ``error`` is planted in the
    term that cancels (``mean``: a relative error in the mean of the cotangent; ``constant``: a
    constant added to the gradient, relative to |x|)."""

    @staticmethod
    def forward(ctx, x, error, size):
        mean = x.mean(0)
        std = (x.var(0, unbiased=False) + 1e-5).sqrt()
        normalised = (x - mean) / std
        ctx.save_for_backward(x, normalised, std)
        ctx.error, ctx.size = error, size
        return normalised

    @staticmethod
    def backward(ctx, grad):
        x, normalised, std = ctx.saved_tensors
        factor = 1.0 - ctx.size if ctx.error == "mean" else 1.0
        dx = (grad - factor * grad.mean(0) - normalised * (grad * normalised).mean(0)) / std
        if ctx.error == "constant":
            dx = dx + ctx.size * x.abs()
        return dx, None, None


class Centred(torch.autograd.Function):
    """x - mean(x), with a relative error ``size`` planted in the cancelling term."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.size = size
        return x - x.mean()

    @staticmethod
    def backward(ctx, grad):
        return grad - (1.0 - ctx.size) * grad.mean(), None


@pytest.mark.parametrize("mode", MODES)
def test_a_float64_batch_norm_summed_over_the_batch_passes(mode):
    for seed in SEEDS:
        report = gc.check(_batch_norm_sum, _x((4, 8), seed), mode=mode, seed=seed)
        assert report.ok, f"seed {seed}: {report}"


@pytest.mark.parametrize("n", [6, 20, 100])
@pytest.mark.parametrize("mode", MODES)
def test_a_float64_output_that_cancels_to_zero_passes(mode, n):
    for seed in SEEDS:
        report = gc.check(_product, _x((n,), seed), mode=mode, seed=seed)
        assert report.ok, f"seed {seed}: {report}"


@pytest.mark.parametrize(("error", "size"), [("mean", 1e-2), ("mean", 1e-4), ("constant", 1e-6)])
@pytest.mark.parametrize("mode", MODES)
def test_an_error_in_a_cancelling_batch_norm_gradient_is_caught(mode, error, size):
    for seed in range(4):
        x = _x((4, 8), seed)
        assert gc.check(lambda x: BatchNorm.apply(x, "", 0.0).sum(0), x, mode=mode, seed=seed).ok
        caught = gc.check(lambda x: BatchNorm.apply(x, error, size).sum(0), x, mode=mode, seed=seed)
        assert caught.pairs[0].status == Status.FAIL, f"seed {seed}: {caught}"


@pytest.mark.parametrize("size", [1e-2, 1e-4])
@pytest.mark.parametrize("n", [6, 100])
@pytest.mark.parametrize("mode", MODES)
def test_an_error_in_a_cancelling_centred_gradient_is_caught(mode, n, size):
    for seed in range(4):
        x = _x((n,), seed)
        assert gc.check(lambda x: Centred.apply(x, 0.0).sum() * x.sum(), x, mode=mode, seed=seed).ok
        caught = gc.check(lambda x: Centred.apply(x, size).sum() * x.sum(), x, mode=mode, seed=seed)
        assert caught.pairs[0].status == Status.FAIL, f"seed {seed}: {caught}"


def test_the_terms_are_measured_only_where_fn_runs_in_float32():
    """A float32 copy measures the terms of a cancellation; fn that computes in float64 whatever
    its inputs gets no measurement, hence no allowance."""
    x = _x((20,), 0)
    terms = narrowed_terms(
        build_problem(_product, [x], {}, input_names=None, device=None, upcast=False)[0], 0
    )
    assert float(terms[0]) > 1.0  # terms of the size of x.sum() * |x|, not of f (~1e-14)

    def in_float64(x):
        wide = x.to(torch.float64)
        return (wide - wide.mean()).sum() * wide.sum()

    problem = build_problem(in_float64, [x], {}, input_names=None, device=None, upcast=False)[0]
    assert float(narrowed_terms(problem, 0).abs().max()) == 0.0
