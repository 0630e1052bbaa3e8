"""Fast mode and a forward that writes into the input it is checked for, through ``.data``.

Fast mode hands fn fresh copies of its inputs only: such a write moves no value the check reads,
and a full re-check of the failing projections judged the Jacobian at a point the write had moved.
"""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.report import Status


def _scales_itself_through_data(x):
    x.data.mul_(1.01)  # .data: a write autograd's version counter does not see
    return x.sin()


def _scales_its_offset_through_data(x, offset):
    offset.data.mul_(1.01)
    return x * offset.sin()


def _wrong_sin(x):
    return _WrongSin.apply(x)


class _WrongSin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos() * 1.01


@pytest.mark.parametrize("size", [4, 100, 2000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("fn", "arity", "name"),
    [(_scales_itself_through_data, 1, "inputs[0]"), (_scales_its_offset_through_data, 2, "inputs[1]")],
)
def test_fast_mode_fails_a_forward_that_writes_into_its_input_and_names_it(fn, arity, name, dtype, size):
    g = torch.Generator().manual_seed(size)
    inputs = [torch.rand(size, dtype=dtype, generator=g) + 0.5 for _ in range(arity)]
    report = gc.check(fn, *inputs, mode="fast")
    assert not report.ok, report
    assert any(p.status == Status.NONDETERMINISTIC for p in report.pairs), report
    assert any(f"fn writes in place into {name}" in note for note in report.notes), report


@pytest.mark.parametrize("size", [4, 2000])
def test_a_wrong_backward_that_writes_nothing_is_still_re_checked_in_full(size):
    x = torch.rand(size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    report = gc.check(_wrong_sin, x, mode="fast")
    (pair,) = report.pairs
    assert pair.status == Status.FAIL, report
    assert pair.message == "fast-mode projections failed; re-checked in full", report
    assert pair.worst, report
    assert not any("writes in place" in note for note in report.notes), report


def test_the_checked_tensor_is_left_as_it_was_by_a_check_that_passes():
    x = torch.rand(100, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    assert gc.check(torch.sin, x, mode="fast").ok
    assert torch.equal(x, before)
