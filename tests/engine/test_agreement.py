"""Agreement of two computations of the same values (re-runs, batched against plain calls)."""

from __future__ import annotations

import math

import torch

from gradcheck_svc.engine.agreement import largest_change, within

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
