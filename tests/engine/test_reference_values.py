"""A few values decide the float64 reference on Python floats as the tensor test decides it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine import context, reference

_CASES: list[tuple[str, Callable[..., torch.Tensor], tuple[torch.Tensor, ...], str]] = [
    ("same function", lambda x: torch.sin(x / 2**1.5), (torch.tensor(100.0),), "float64"),
    ("two inputs", lambda u, v: u * v + u**2 + v**3, (torch.tensor(2.0), torch.tensor(4.0)), "float64"),
    (
        "branches on dtype",
        lambda x: x * (1.0 if x.dtype == torch.float32 else 1.01),
        (torch.ones(3),),
        "float32",
    ),
    ("overflows in float32 alone", lambda x: torch.exp(x * 100), (torch.tensor([1.0, -1.0]),), "float32"),
    ("NaN at the same element", lambda x: torch.log(x), (torch.tensor([-1.0, 2.0]),), "float64"),
    ("NaN and inf inputs", lambda x: x.sum() * 2, (torch.tensor([1.0, math.nan, math.inf]),), "float64"),
    (
        "near the rounding",
        lambda x: x + (1e-4 if x.dtype == torch.float64 else 0.0),
        (torch.ones(2),),
        "float64",
    ),
    (
        "beyond the rounding",
        lambda x: x + (1e-2 if x.dtype == torch.float64 else 0.0),
        (torch.ones(2),),
        "float32",
    ),
]


@pytest.mark.parametrize(("name", "fn", "inputs", "expected"), _CASES, ids=[c[0] for c in _CASES])
def test_the_reference_of_a_few_values_is_the_tensor_tests(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    expected: str,
) -> None:
    on_floats = gc.check(fn, *inputs)
    monkeypatch.setattr(reference, "FEW_VALUES", 0)  # the tensor test
    on_tensors = gc.check(fn, *inputs)
    assert on_floats.options["reference"] == on_tensors.options["reference"] == expected
    assert on_floats.notes == on_tensors.notes


def test_the_forward_rounding_of_a_few_values_is_the_tensor_formulas() -> None:
    values = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1e-300,
        5e-324,
        2.5,
        1e308,
        math.inf,
        -math.inf,
        math.nan,
        3.0000001,
        -2.0,
    ]
    pairs = list(itertools.product(values, values))
    low = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    wide = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    gap = (low - wide).abs() / wide.abs()
    expected = torch.where(low == wide, 0.0, gap).nan_to_num(nan=1.0, posinf=1.0).clamp(max=1.0)
    on_floats = torch.cat(
        [context._relative_gap(low[k : k + 8], wide[k : k + 8]) for k in range(0, len(pairs), 8)]
    )
    assert torch.equal(on_floats, expected)
    assert torch.equal(context._relative_gap(low, wide), expected)  # more values than FEW_VALUES: tensors
