"""Verdicts of checks whose finite differences stay in the user's low precision.

When fn cannot run on float64 copies of its inputs (a float32 constant or kernel inside it), the
differences are float32 and their noise must be measured from fn itself: where the forward
cancels (``1 + tanh(u)`` in a GeLU tail, ``(x^2 + K) - K``), its rounding is far above the ulp
of its output and a single stencil may not show it. And float32 steps are large enough that a
kink often falls inside the step rather than at x.
"""

from __future__ import annotations

import pytest
import torch
from corpus import CASES, make_inputs

import gradcheck_svc as gc


def _only(dtype: torch.dtype, fn):
    """``fn`` refusing other floating dtypes, as code holding constants of one dtype does."""

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        if any(t.is_floating_point() and t.dtype != dtype for t in inputs):
            raise TypeError(f"written for {dtype} inputs only")
        return fn(*inputs)

    return call


_GELU = next(case for case in CASES if case.name == "tanh_gelu")
_SPARSEMAX = next(case for case in CASES if case.name == "sparsemax")


# Seeds at which the GeLU tails' rounding (z near -4.5, a bias of |b| < 1 and so a step of
# 2^-7) put the float32 difference several tolerances off the exact derivative.
@pytest.mark.parametrize("seed", [5, 14, 28, 36, 37, 38, 52, 81])
def test_float32_gelu_tails_pass_with_in_dtype_differences(seed):
    inputs = make_inputs(_GELU, seed, torch.float32)
    report = gc.check(_only(torch.float32, _GELU.bound()), *inputs, seed=seed, mode="full")
    assert report.ok, str(report)
    assert report.options["reference"] == "float32"


@pytest.mark.parametrize("bug", _GELU.bugs)
def test_float32_gelu_bugs_still_caught_where_the_tails_cancel(bug):
    inputs = make_inputs(_GELU, 37, torch.float32)
    assert not gc.check(_only(torch.float32, _GELU.bound(bug)), *inputs, seed=37, mode="full").ok


class _ShiftedSquare(torch.autograd.Function):
    """x^2 through a float32 cancellation: (x^2 + 1024) - 1024 rounds to steps of 2^-13."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(x)
        ctx.factor = factor
        shift = torch.tensor(1024.0)
        return (x * x + shift) - shift

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x * ctx.factor, None


@pytest.mark.parametrize("seed", range(16))
def test_cancellation_inside_a_float32_forward_is_no_false_alarm(seed):
    x = torch.randn(30, generator=torch.Generator().manual_seed(seed))
    correct = gc.check(_only(torch.float32, lambda x: _ShiftedSquare.apply(x, 1.0)), x, seed=seed)
    assert correct.ok, str(correct)
    wrong = gc.check(_only(torch.float32, lambda x: _ShiftedSquare.apply(x, 1.05)), x, seed=seed)
    assert not wrong.ok


# Seeds at which a sparsemax support boundary falls between x and x + h for some element.
@pytest.mark.parametrize("seed", [4, 12, 65])
def test_float32_sparsemax_support_boundary_inside_the_step(seed):
    inputs = make_inputs(_SPARSEMAX, seed, torch.float32)
    report = gc.check(_only(torch.float32, _SPARSEMAX.bound()), *inputs, seed=seed, mode="full")
    assert report.ok, str(report)
    for bug in _SPARSEMAX.bugs:
        assert not gc.check(_only(torch.float32, _SPARSEMAX.bound(bug)), *inputs, seed=seed).ok


def _ramp(at: torch.Tensor, slip: float):
    """3 * relu(x - at); its backward adds ``slip`` to the derivative."""

    class Ramp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.relu(x - at) * 3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * ((x > at).to(grad.dtype) * 3 + slip)

    return Ramp.apply


@pytest.mark.parametrize("where", [0.3, 0.45, 0.55])
def test_a_kink_inside_the_step_is_a_kink_not_a_failure(where):
    # x = 1 lies on the flat piece; the kink sits at x + where * h (h = 2^-16 in float64), so
    # D+ and D+(2h) cross it while D- reads the flat piece that the analytic 0 belongs to.
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    at = torch.tensor([1.0 + where * 2.0**-16, 0.0], dtype=torch.float64)
    report = gc.check(_ramp(at, 0.0), x)
    assert report.ok, str(report)
    assert report.pairs[0].kinks == 1
    wrong = gc.check(_ramp(at, 0.5), x)
    assert not wrong.ok
    assert {tuple(el.input_index) for el in wrong.pairs[0].worst if not el.kink} >= {(1,)}
