"""Fast mode with every leaf in one set of ops reports what fast mode leaf by leaf reports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from corpus import CASES, make_inputs
from fast_paths import reports_with_and_without
from test_tiny import _differences, _problem

from gradcheck_svc.engine import fast_batched, fast_floats

D = torch.float64


def _both(
    monkeypatch: pytest.MonkeyPatch, fn: Callable[..., torch.Tensor], inputs: tuple[Any, ...], **options: Any
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The fast-mode report with all leaves at once and leaf by leaf, and whether the first
    took the batched path (the float path is off for both)."""
    monkeypatch.setattr(fast_floats, "ENABLED", False)
    return reports_with_and_without(monkeypatch, fast_batched, "run_fast_batched", fn, inputs, **options)


@pytest.mark.parametrize("seed", range(80))
@pytest.mark.parametrize(
    "options", [{}, {"error_bars": 2.5, "kinks": "fail", "projections": 3}, {"projections": 2}]
)
def test_small_problems_report_the_same_batched(
    monkeypatch: pytest.MonkeyPatch, seed: int, options: dict[str, Any]
) -> None:
    kind, fn, inputs = _problem(seed)
    batched, by_leaf, took_batched = _both(monkeypatch, fn, inputs, **options)
    differing = list(_differences(batched, by_leaf))
    if kind == "random":  # every call draws new values: only the verdict must agree
        differing = [d for d in differing if ".status" in d or d.startswith(".ok") or ".notes" in d]
    assert not differing, differing[:5]
    assert took_batched


def _in_float32(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn returning float32 whatever its inputs: no float64 copy can stand in for it."""

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        return fn(*inputs).float()

    return call


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_planted_bugs_get_the_same_verdicts_batched(
    monkeypatch: pytest.MonkeyPatch, case: Any, dtype: torch.dtype
) -> None:
    """Several leaves, wrong backwards, float32 differenced in float32: every pair alike."""
    for bug in ("none", *case.bugs):
        fn = case.bound(bug) if dtype == D else _in_float32(case.bound(bug))
        for seed in range(2):
            inputs = make_inputs(case, seed, dtype, shape=(6, 5))
            batched, by_leaf, took_batched = _both(monkeypatch, fn, inputs, seed=seed)
            assert took_batched
            assert not list(_differences(batched, by_leaf)), (bug, seed)
            if bug != "none" and dtype == D:
                assert not batched["ok"], (bug, seed)


def test_a_dense_layer_and_its_planted_bug_report_the_same_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 200, generator=g, dtype=D) / 200**0.5
    x = torch.randn(200, generator=g, dtype=D)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            wrong = 1 - torch.tanh(x) ** 2
            wrong[7] *= 1.5  # one element of the diagonal off
            return grad * wrong

    for fn, expected in [
        (lambda x: torch.sin(torch.tanh(w @ x)), True),
        (lambda x: Wrong.apply(w @ x), False),
    ]:
        batched, by_leaf, took_batched = _both(monkeypatch, fn, (x,))
        assert took_batched
        assert not list(_differences(batched, by_leaf))
        assert batched["ok"] is expected


def test_four_directions_or_a_float64_reference_go_leaf_by_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.linspace(-1, 1, 30, dtype=D)
    for fn, inputs, options in [
        (torch.tanh, (x,), {"projections": 4}),  # enough directions for a noise median
        (torch.tanh, (x.float(),), {}),  # float32 with a float64 reference
    ]:
        batched, by_leaf, took_batched = _both(monkeypatch, fn, inputs, **options)
        assert not took_batched
        assert not list(_differences(batched, by_leaf))


def test_a_complex_leaf_beside_a_real_one_reports_the_same_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    z = torch.randn(5, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    w = torch.randn(3, dtype=D, generator=torch.Generator().manual_seed(4))

    def fn(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (z.abs() ** 2).sum() * w + torch.view_as_real(z * z).sum()

    batched, by_leaf, took_batched = _both(monkeypatch, fn, (z, w))
    assert took_batched
    assert not list(_differences(batched, by_leaf))
    assert batched["ok"]
