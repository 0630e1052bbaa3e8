"""Outputs that are themselves a cancellation (f ~ 0 built from terms of size 1), in float32 with
a float64 reference.

``(x - x.mean()).sum()`` is 0 up to rounding, and so is its derivative: a float32 backward
rounds the terms it sums at their own size (that of x.sum(), the cotangent), and the float64
differences of such an f carry rounding of those terms over the step. The allowance for a
cancelling derivative scaled with |f| (about 1e-7 here), so correct code failed on most seeds.
The size of the terms is now measured at a few points near x; a backward that gets the
cancellation wrong is still caught by the float64 run of the same backward.
"""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.report import Status

MODES = ["full", "fast", "auto"]
SEEDS = range(6)


def _product(x):
    return (x - x.mean()).sum() * x.sum()


def _scaled(x):
    return 1e4 * (x - x.mean()).sum() + x.sum() * 0


class Centred(torch.autograd.Function):
    """x - mean(x): invariant to a shift of the whole input."""

    @staticmethod
    def forward(ctx, x, wrong):
        ctx.wrong = wrong
        return x - x.mean()

    @staticmethod
    def backward(ctx, grad):
        factor = 0.9999 if ctx.wrong else 1.0  # a 0.01% error in the cancelling term
        return grad - factor * grad.mean(), None


@pytest.mark.parametrize("n", [6, 20, 100])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", [_product, _scaled], ids=["times_sum", "scaled"])
def test_a_float32_output_that_cancels_to_zero_passes(fn, mode, n):
    for seed in SEEDS:
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        report = gc.check(fn, x, mode=mode, seed=seed)
        assert report.ok, f"seed {seed}: {report}"


@pytest.mark.parametrize("n", [6, 20])
@pytest.mark.parametrize("mode", MODES)
def test_a_small_error_in_the_cancelling_term_is_still_caught(mode, n):
    for seed in SEEDS:
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed))

        def right(x):
            return Centred.apply(x, False).sum() * x.sum()

        def wrong(x):
            return Centred.apply(x, True).sum() * x.sum()

        assert gc.check(right, x, mode=mode, seed=seed).ok
        caught = gc.check(wrong, x, mode=mode, seed=seed)
        assert caught.pairs[0].status == Status.FAIL, f"seed {seed}: {caught}"
