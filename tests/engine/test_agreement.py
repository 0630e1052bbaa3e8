"""Agreement of two computations of the same values (re-runs, batched against plain calls)."""

from __future__ import annotations

import math

import pytest
import torch

from gradcheck_svc.engine.agreement import all_finite, largest_change, within, within_ulps

INF, NAN = math.inf, math.nan


def test_equal_values_infinities_included_are_no_change() -> None:
    first = torch.tensor([1.0, INF, -INF, NAN], dtype=torch.float64)
    assert largest_change(first, first.clone()) == 0.0
    assert within(first, first.clone(), 0.0)


def test_nan_in_one_run_only_is_an_infinite_change() -> None:
    first = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert largest_change(first, torch.tensor([1.0, NAN], dtype=torch.float64)) == INF
    assert not within(first, torch.tensor([NAN, 2.0], dtype=torch.float64), 1.0)


def test_finite_changes_are_measured_and_allowed_up_to_the_allowance() -> None:
    first = torch.tensor([1.0, 2.0], dtype=torch.float64)
    again = torch.tensor([1.0, 2.5], dtype=torch.float64)
    assert largest_change(first, again) == 0.5
    assert within(first, again, 0.5) and not within(first, again, 0.25)
    assert largest_change(torch.zeros(0), torch.zeros(0)) == 0.0


def _within_ulps_on_tensors(a: torch.Tensor, b: torch.Tensor, unit: float, both: bool) -> bool:
    scale = (torch.maximum(a.abs(), b.abs()) if both else b.abs()).nan_to_num(nan=0.0, posinf=0.0)
    return within(a, b, 64 * unit * (scale + (scale.max() if scale.numel() else 0.0)))


def test_within_ulps_on_floats_agrees_with_the_tensor_arithmetic() -> None:
    g = torch.Generator().manual_seed(0)
    unit = 2.0**-52
    specials = torch.tensor([0.0, INF, -INF, NAN, 1e300], dtype=torch.float64)
    for trial in range(300):
        n = 1 + trial % 9
        a = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** float(trial % 7 - 3)
        if trial % 4 == 0:
            a[trial % n] = specials[trial % 5]
        ulps = torch.randint(-300, 300, (n,), generator=g).to(torch.float64)
        b = a + ulps * unit * a.abs()
        if trial % 6 == 0:
            b[0] = NAN if trial % 12 == 0 else b[0] * 1.01
        if trial % 10 == 5:  # NaN on one side beside a large value: its magnitude counts 0
            a[0], b[0], b[-1] = 1e6, NAN, b[-1] * (1 + 1e-12)
        for both in (False, True):
            assert within_ulps(a, b, unit, both=both) == _within_ulps_on_tensors(a, b, unit, both)
    big = torch.randn(100, generator=g, dtype=torch.float64)  # past the float threshold: tensors
    assert within_ulps(big, big * (1 + 8 * unit), unit) and not within_ulps(big, big * 1.001, unit)


@pytest.mark.parametrize("n", [1, 16, 17, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_all_finite_finds_every_nan_and_infinity(n, dtype):
    values = torch.linspace(-3, 3, n, dtype=dtype)
    assert all_finite(values)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for k in {0, n // 2, n - 1}:
            spoiled = values.clone()
            spoiled[k] = bad
            assert not all_finite(spoiled)
    if n > 1:
        both = values.clone()
        both[0], both[-1] = float("inf"), float("-inf")  # their sum is NaN
        assert not all_finite(both)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_all_finite_when_the_sum_of_finite_values_overflows(dtype):
    big = torch.full((100,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum())
    assert all_finite(big)
    assert all_finite(big.reshape(10, 10)) and all_finite(torch.zeros(0, dtype=dtype))
