"""Functions that misbehave from call to call: each gets an error of the project's own tree that
says what happened, never a torch error from deep inside the engine."""

from __future__ import annotations

import itertools

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.errors import CheckError

MODES = ["full", "fast", "auto"]
DTYPES = [torch.float64, torch.float32]


def _every_other_call_one_longer():
    calls = itertools.count()
    return lambda x: x.sin() if next(calls) % 2 == 0 else torch.cat([x.sin(), x[:1]])


def _shorter_after_two_calls():
    calls = itertools.count()
    return lambda x: x.sin() if next(calls) < 2 else x[:2].sin()


def _another_dtype_every_other_call():
    calls = itertools.count()
    return lambda x: x.sin() if next(calls) % 2 == 0 else x.sin().to(torch.float16)


@pytest.mark.parametrize(
    "make", [_every_other_call_one_longer, _shorter_after_two_calls, _another_dtype_every_other_call]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_an_output_that_changes_between_calls_is_a_clear_error(make, dtype, mode):
    x = torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    try:
        report = gc.check(make(), x, mode=mode)
    except CheckError as exc:
        assert isinstance(exc, TypeError)
        assert "fn's outputs changed between calls" in str(exc)
        assert "at the first call" in str(exc)
    else:  # the calls the check made all returned what the first did
        assert report.ok, report


def test_an_output_that_changes_shape_fails_the_fixture_with_the_same_error():
    with pytest.raises(gc.OutputTypeError, match=r"\[5\] float64 here, \[4\] float64 at the first call"):
        gc.assert_grads(_every_other_call_one_longer(), torch.randn(4, dtype=torch.float64), mode="full")


class SineWithNoisyBackward(torch.autograd.Function):
    """sin whose backward adds relative noise of 1e-12 (as atomic adds reorder a sum)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos() * (1 + 1e-12 * torch.randn_like(x))


@pytest.mark.parametrize("mode", MODES)
def test_a_nondeterministic_backward_says_how_much_and_which_option_accepts_it(mode):
    x = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = gc.check(SineWithNoisyBackward.apply, x, mode=mode)
    assert [p.status.value for p in report.pairs] == ["nondeterministic"], report
    assert "beyond nondet_tol" in str(report)
    assert gc.check(SineWithNoisyBackward.apply, x, mode=mode, nondet_tol=1e-9).ok


class SineTimesNaN(torch.autograd.Function):
    """A forward that returns NaN with a backward that returns NaN too: nothing to verify."""

    @staticmethod
    def forward(ctx, x):
        return x.sin() * float("nan")

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_an_output_that_is_nan_at_the_point_fails_even_where_the_backward_agrees(dtype, mode):
    x = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=dtype)
    report = gc.check(SineTimesNaN.apply, x, mode=mode)
    assert [p.status.value for p in report.pairs] == ["nonfinite"], report
    assert "fn's value is NaN at this point (output[0])" in str(report)
    partly = gc.check(lambda x: torch.stack([x.sum(), torch.sqrt(-x.abs() - 1).sum()]), x, mode=mode)
    assert [p.status.value for p in partly.pairs] == ["nonfinite"], partly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_an_output_that_is_infinite_at_the_point_fails_in_every_mode(dtype, mode):
    """An overflow at the point: fast mode's projection used to pass it."""
    x = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    report = gc.check(lambda x: torch.exp(1000 * x), x, mode=mode)
    assert [p.status.value for p in report.pairs] == ["nonfinite"], report
    assert "infinite at this point" in str(report)
