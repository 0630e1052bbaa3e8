"""Planted gradient bugs are caught in float64 and in float32, and located."""

from __future__ import annotations

import pytest
import torch
from planted import AddBias, MatVec, Mul, Square

import gradcheck_svc as gc

DTYPES = [torch.float32, torch.float64]


def _x(dtype, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype) + 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bug", ["sign", "factor", "scale1pct", "negative_only", "drop_one"])
def test_square_bugs_are_caught(bug, dtype):
    x = _x(dtype)
    report = gc.check(lambda x: Square.apply(x, bug), x)
    assert not report.ok, str(report)
    (pair,) = report.pairs
    assert pair.status == gc.Status.FAIL
    assert pair.worst and not pair.worst[0].kink


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_twin_passes(dtype):
    assert gc.check(lambda x: Square.apply(x, "none"), _x(dtype)).ok


def test_relative_error_of_1e6_caught_in_float64():
    report = gc.check(lambda x: Square.apply(x, "scale1e-6"), _x(torch.float64))
    assert not report.ok


def test_negative_only_bug_points_at_negative_elements():
    x = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    report = gc.check(lambda x: Square.apply(x, "negative_only"), x)
    (pair,) = report.pairs
    assert pair.elements_failed == 1
    assert pair.worst[0].input_index == [1] and pair.worst[0].output_index == [1]
    assert pair.worst[0].analytic == pytest.approx(4.0)
    assert pair.worst[0].numeric == pytest.approx(-4.0, rel=1e-6)


def test_dropped_element_is_located():
    report = gc.check(lambda x: Square.apply(x, "drop_one"), _x(torch.float32))
    worst = report.pairs[0].worst[0]
    assert (worst.output_index, worst.input_index, worst.analytic) == ([1], [1], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_matmul_backward(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(4, generator=g, dtype=torch.float64).to(dtype)
    report = gc.check(lambda w, x: MatVec.apply(w, x, True), w, x, input_names=["w", "x"])
    by_input = {p.input: p for p in report.pairs}
    assert by_input["w"].ok
    assert by_input["x"].status == gc.Status.FAIL
    assert gc.check(lambda w, x: MatVec.apply(w, x, False), w, x).ok


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_broadcast_reduction(dtype):
    x = torch.randn(5, 3, dtype=dtype)
    b = torch.randn(3, dtype=dtype)
    report = gc.check(lambda x, b: AddBias.apply(x, b, True), x, b, input_names=["x", "b"])
    by_input = {p.input: p for p in report.pairs}
    assert by_input["x"].ok and by_input["b"].status == gc.Status.FAIL
    assert gc.check(lambda x, b: AddBias.apply(x, b, False), x, b).ok


@pytest.mark.parametrize("dtype", DTYPES)
def test_bug_in_second_input_only(dtype):
    x, y = _x(dtype, seed=2), _x(dtype, seed=3)
    report = gc.check(lambda x, y: Mul.apply(x, y, True), x, y, input_names=["x", "y"])
    by_input = {p.input: p for p in report.pairs}
    assert by_input["x"].ok
    assert by_input["y"].status == gc.Status.FAIL
    assert "d output / d y" in str(report)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_fast_mode_catches_and_relocates(mode):
    x = _x(torch.float64, n=200)
    report = gc.check(lambda x: Square.apply(x, "scale1pct"), x, mode=mode)
    assert not report.ok
    (pair,) = report.pairs
    assert pair.mode == "full"  # fast mode re-checks a failing pair in full
    assert pair.worst[0].output_index == pair.worst[0].input_index
