"""A backward that is not linear in grad_output fails, though the Jacobian's unit rows agree."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.report import Status


class SquaredLoss(torch.autograd.Function):
    """sum(x^2), a loss: one output element, so ``grad_output = 1`` is the Jacobian's only row."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return (x * x).sum()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.bug:
            return 2 * x, None  # forgot grad_output
        return 2 * x * grad, None


class SignedSquare(torch.autograd.Function):
    """x^2 elementwise; the bug takes grad_output's sign for its value, as unit rows cannot show."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * (grad.sign() if ctx.bug else grad), None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", [3, 200, 3000])  # the tiny path, dense rows, more rows than one batch
@pytest.mark.parametrize("function", [SquaredLoss, SignedSquare])
def test_backward_not_linear_in_grad_output_fails(function, size, dtype):
    if function is SignedSquare and size == 3000:
        size = 1000  # keeps the full Jacobian small
    x = torch.randn(size, dtype=dtype, generator=torch.Generator().manual_seed(size))
    wrong = gc.check(lambda t: function.apply(t, True), x)
    assert not wrong.ok
    assert [p.status for p in wrong.pairs] == [Status.FAIL]
    assert wrong.pairs[0].elements_failed == 0  # every unit row agrees: only linearity shows it
    assert "not linear in grad_output" in wrong.pairs[0].message
    right = gc.check(lambda t: function.apply(t, False), x)
    assert right.ok, right


def test_nondeterminism_is_still_told_from_nonlinearity():
    class Noisy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * x.cos() * (1 + 1e-3 * torch.rand(()))

    report = gc.check(Noisy.apply, torch.randn(6, dtype=torch.float64))
    assert [p.status for p in report.pairs] == [Status.NONDETERMINISTIC]
    assert "linear" not in report.pairs[0].message


@pytest.mark.parametrize("size", [3, 40, 300])
def test_subnormal_values_of_a_linear_backward_are_not_nonlinearity(size):
    # x @ w * 1e-41 in float32: the backward's values are subnormal, rounded to a grid the doubled
    # re-run falls between; halving it back is then not exact, though the backward is linear
    x = torch.linspace(0.3, 1.7, size, dtype=torch.float32)
    w = torch.linspace(0.5, 1.5, size, dtype=torch.float32)
    report = gc.check(lambda t: torch.stack([(t * w).sum(), (t * w * 1e-41).sum()]), x)
    assert report.ok, report


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("size", [1, 5, 300])
def test_a_gradient_that_overflows_when_doubled_is_not_nonlinearity(size, mode):
    # 40000 is a float16 value; the doubled re-run's 80000 is not (inf), though the backward is linear
    x = torch.linspace(0.5, 1.5, size, dtype=torch.float16)
    report = gc.check(lambda t: t * 40000.0, x, mode=mode)
    assert report.ok, report
