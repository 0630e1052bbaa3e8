"""The three seed examples, in float32 (as written) and float64."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_square_at_9_is_18(dtype):
    report = gc.check(lambda x: x**2, torch.tensor(9.0, dtype=dtype))
    assert report.ok
    (pair,) = report.pairs
    assert pair.analytic == pytest.approx([18.0])
    assert pair.numeric == pytest.approx([18.0], rel=1e-4)
    assert "18" in str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sin_at_100(dtype):
    report = gc.check(lambda x: torch.sin(x / 2**1.5), torch.tensor(100.0, dtype=dtype))
    assert report.ok
    (pair,) = report.pairs
    assert round(pair.analytic[0], 4) == -0.2469
    assert round(pair.numeric[0], 4) == -0.2469
    assert "-0.2469" in str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_inputs(dtype):
    u, v = torch.tensor(2.0, dtype=dtype), torch.tensor(4.0, dtype=dtype)
    report = gc.check(lambda u, v: u * v + u**2 + v**3, u, v, input_names=["u", "v"])
    assert report.ok
    by_input = {p.input: p for p in report.pairs}
    assert by_input["u"].analytic == pytest.approx([8.0])
    assert by_input["v"].analytic == pytest.approx([50.0])
    assert by_input["u"].numeric[0] == pytest.approx(8.0, rel=1e-3)
    assert by_input["v"].numeric[0] == pytest.approx(50.0, rel=1e-3)
    text = str(report)
    assert "d output / d u" in text and "8" in text and "50" in text


def test_report_round_trips_through_json():
    report = gc.check(lambda x: x**2, torch.tensor(9.0))
    again = gc.Report.model_validate_json(report.model_dump_json())
    assert again == report
    assert str(again) == str(report)


def test_assert_grads_returns_report_and_raises_on_mismatch():
    from planted import Square

    assert gc.assert_grads(lambda x: x**2, torch.tensor(9.0)).ok
    with pytest.raises(gc.GradientMismatch) as info:
        gc.assert_grads(lambda x: Square.apply(x, "sign"), torch.tensor([9.0, 2.0]))
    assert isinstance(info.value, AssertionError)
    assert "output[0] / inputs[0][0]" in str(info.value)
    assert info.value.report.ok is False
