"""float64 inputs, float32 outputs: the step suits the outputs' precision, so a 1% error shows."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc


class ScaledToFloat(torch.autograd.Function):
    """3 * sin(x) returned as float32 from float64 x; ``factor`` scales the backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(x)
        ctx.factor = factor
        return (3 * x.sin()).float()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (3 * x.cos() * grad.double() * ctx.factor), None


@pytest.mark.parametrize("shape", [(), (4,), (30, 20)])
def test_one_percent_error_on_float32_outputs_of_float64_inputs_fails(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    assert not gc.check(lambda t: ScaledToFloat.apply(t, 1.01), x).ok
    assert gc.check(lambda t: ScaledToFloat.apply(t, 1.0), x).ok


def test_mixed_outputs_keep_the_float64_step():
    x = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    report = gc.check(lambda t: (t.exp(), t.sin().float()), x)
    assert report.ok, report
    assert "h = 1.5e-05" in str(report)  # a float64 output still sets the float64 step
