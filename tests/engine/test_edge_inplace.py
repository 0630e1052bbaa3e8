"""In-place writes at the edges of the calling convention: a backward that writes into its
grad_output, a forward that writes into an input the check does not perturb."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.report import Status

MODES = ["full", "fast", "auto"]
DTYPES = [torch.float64, torch.float32]


class SquareScalingGradInPlace(torch.autograd.Function):
    """x**2 whose backward scales grad_output in place and returns it (correct, and common)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.mul_(2 * x)


class WrongSquareScalingGradInPlace(SquareScalingGradInPlace):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.mul_(2.2 * x)


SHAPES = {"scalar": (), "vector": (3,), "matrix": (40, 40)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_a_backward_that_writes_into_its_grad_output_is_judged_on_its_values(shape, dtype, mode):
    x = torch.rand(SHAPES[shape], generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.5
    report = gc.check(SquareScalingGradInPlace.apply, x, mode=mode)
    assert report.ok, report
    caught = gc.check(WrongSquareScalingGradInPlace.apply, x, mode=mode)
    assert [p.status for p in caught.pairs] == [Status.FAIL], caught


def _bumps_its_offset(x, offset):
    offset.add_(1.0)
    return x * offset


def _bumps_a_counter(x, counter):
    counter += 1
    return x * counter


@pytest.mark.parametrize("fn", [_bumps_its_offset, _bumps_a_counter])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_a_forward_that_writes_into_an_input_it_is_not_checked_for_says_so(fn, dtype, mode):
    x = torch.rand(3, dtype=dtype, requires_grad=True)
    other = torch.rand(3, dtype=dtype) if fn is _bumps_its_offset else torch.tensor([1, 2, 3])
    report = gc.check(fn, x, other, mode=mode)
    assert [p.status for p in report.pairs] == [Status.NONDETERMINISTIC], report
    assert "fn writes in place into inputs[1]" in report.pairs[0].message
    assert any("fn writes in place into inputs[1]" in note for note in report.notes)
    assert "two backward runs differ" not in str(report)  # the forward's doing, not the backward's


def test_a_forward_that_updates_a_buffer_its_output_ignores_passes_and_names_it():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).double()
    report = gc.check(module, torch.randn(4, 3, dtype=torch.float64))
    assert report.ok, report
    assert any("fn writes in place into 1.num_batches_tracked" in note for note in report.notes)


class ExpScalingItsSavedOutput(torch.autograd.Function):
    """exp whose backward writes into the tensor it saved: it can run once per forward only."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y.mul_(1.0)


@pytest.mark.parametrize("size", [3, 100])
@pytest.mark.parametrize("mode", MODES)
def test_a_backward_that_writes_into_what_it_saved_gets_an_error_that_says_why(size, mode):
    with pytest.raises(gc.FunctionRaisedError, match="runs the backward several times on one graph"):
        gc.check(ExpScalingItsSavedOutput.apply, torch.rand(size, dtype=torch.float64), mode=mode)


def _scales_its_offset_through_data(x, offset):
    offset.data.mul_(1.01)  # .data: a write autograd's version counter does not see
    return x * offset.sin()


def _scales_itself_through_data(x):
    x.data.mul_(1.01)
    return x.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["full", "auto"])
def test_a_write_through_data_is_named_when_the_check_fails(dtype, mode):
    x, offset = torch.rand(4, dtype=dtype), torch.rand(4, dtype=dtype)
    for fn, inputs, name in [
        (_scales_its_offset_through_data, (x, offset), "inputs[1]"),
        (_scales_itself_through_data, (x,), "inputs[0]"),
    ]:
        report = gc.check(fn, *(t.clone() for t in inputs), mode=mode)
        assert not report.ok, report
        assert any(f"fn writes in place into {name}" in note for note in report.notes), report


class CubeScalingGradInPlace(torch.autograd.Function):
    """x**3 whose (differentiable) backward scales grad_output in place."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.mul_(3 * x * x)


class WrongCubeScalingGradInPlace(CubeScalingGradInPlace):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.mul_(3 * x * x.detach())  # the second derivative misses a term


def test_second_order_of_a_backward_that_writes_into_its_grad_output():
    x = torch.rand(3, dtype=torch.float64) + 0.5
    report = gc.check(CubeScalingGradInPlace.apply, x, order=2)
    assert report.ok, report
    caught = gc.check(WrongCubeScalingGradInPlace.apply, x, order=2)
    assert [p.status for p in caught.pairs] == [Status.FAIL], caught
