"""Derivatives that are zero because terms cancel (an input a normalisation or a softmax's sum is
invariant to): a float32 backward rounds those terms at the scale of the values around them, not
at the scale of the zero result, and must pass; a backward that gets the cancellation wrong must
still fail, caught by the float64 run of the same backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradcheck_svc as gc
from gradcheck_svc.report import Status

MODES = ["full", "fast", "auto"]
SEEDS = range(4)


def _linear_then_batch_norm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


CASES = {
    "softmax rows sum to one": (lambda x: torch.softmax(x, -1).sum(-1), [(4, 6)]),
    "layer norm ignores a shift": (lambda x, b: F.layer_norm(x + b, (6,)), [(4, 6), (4, 1)]),
    "batch norm ignores a bias": (
        lambda x, b: F.batch_norm(x + b, None, None, training=True),
        [(5, 3), (3,)],
    ),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_float32_derivative_that_cancels_to_zero_passes(case, mode, seed):
    fn, shapes = CASES[case]
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=g) for shape in shapes]
    report = gc.check(fn, *inputs, mode=mode)
    assert report.ok, report


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_float32_module_whose_bias_a_batch_norm_cancels_passes(mode, seed):
    report = gc.check(
        _linear_then_batch_norm(seed), torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    )
    assert report.ok, report


class Centred(torch.autograd.Function):
    """x - mean(x) along the last dimension: invariant to a shift of each row."""

    @staticmethod
    def forward(ctx, x):
        return x - x.mean(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return grad - grad.mean(-1, keepdim=True)


class CentredSlightlyWrong(Centred):
    @staticmethod
    def backward(ctx, grad):
        return grad - 0.9999 * grad.mean(-1, keepdim=True)  # a 0.01% error in the cancelling term


WEIGHTS = torch.linspace(0.5, 2.0, 5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", MODES)
def test_a_small_error_in_a_cancelling_term_is_still_caught_in_float32(mode, seed):
    g = torch.Generator().manual_seed(seed)
    x, shift = torch.randn(3, 5, generator=g), torch.randn(3, 1, generator=g)
    # d/d shift is zero (the rows' weights minus their mean sum to zero), up to float32 rounding
    assert gc.check(lambda x, b: (Centred.apply(x + b) * WEIGHTS).sum(-1), x, shift, mode=mode).ok
    caught = gc.check(lambda x, b: (CentredSlightlyWrong.apply(x + b) * WEIGHTS).sum(-1), x, shift, mode=mode)
    assert {p.input: p.status for p in caught.pairs} == {
        "inputs[0]": Status.FAIL,
        "inputs[1]": Status.FAIL,
    }, caught
