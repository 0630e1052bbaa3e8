"""Tiny float32 checks against their float64 reference report what the column path reports."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from planted import SEED_EXAMPLES
from test_tiny import _differences

import gradcheck_svc as gc
from gradcheck_svc.engine import api, tiny

Factory = Callable[[], tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]


class _Scaled(torch.autograd.Function):
    """sin with a backward off by a factor: 1.01 is caught in float32, 1 + 1e-6 only by the float64
    run of the backward (float32 rounding hides it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.factor = factor
        return torch.sin(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * torch.cos(x) * ctx.factor, None


def _flaky_backward() -> Callable[[torch.Tensor], torch.Tensor]:
    """tanh whose backward drifts from call to call, the same way in every check that starts from
    a fresh function: nondeterministic, yet reproducible."""
    calls = itertools.count()

    class Flaky(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            y = torch.tanh(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (y,) = ctx.saved_tensors
            return g * (1 - y * y) * (1 + 1e-3 * next(calls))

    return lambda x: Flaky.apply(x)


def _cases(seed: int) -> dict[str, Factory]:
    """Small float32 problems: correct, wrong backwards, kinks, non-finite values, nondeterminism."""
    g = torch.Generator().manual_seed(seed)
    r = random.Random(seed)
    n = r.choice([1, 2, 3, 5, 8])
    shape: tuple[int, ...] = () if n == 1 and r.random() < 0.5 else (n,)
    scale = r.choice([1.0, 10.0, 1e-2, 1e3])
    x = torch.randn(shape, generator=g) * scale
    w = torch.randn(r.choice([1, 2, 4]), n, generator=g)
    b = torch.randn(w.shape[0], generator=g)
    kink_at = 1 + r.choice([0.2, 0.35, 0.5]) * 2.0**-16  # a kink between x = 1 and x + 2h
    return {
        "square": lambda: ((lambda x: (x**2).sum()), (x,)),
        "seed_square": lambda: ((lambda x: x**2), (torch.tensor(9.0),)),
        "seed_sin": lambda: ((lambda x: torch.sin(x / 2**1.5)), (torch.tensor(100.0),)),
        "seed_two": lambda: ((lambda u, v: u * v + u**2 + v**3), (torch.tensor(2.0), torch.tensor(4.0))),
        "dense": lambda: ((lambda x: torch.tanh(w.to(x.dtype) @ x.reshape(-1))), (x,)),
        "affine": lambda: (
            (lambda x, b: w.to(x.dtype) @ x.reshape(-1) + b),
            (x, b),
        ),
        "wrong": lambda: ((lambda x: _Scaled.apply(x, 1.01).sum()), (x,)),
        "wrong_in_float64_only": lambda: ((lambda x: _Scaled.apply(x, 1 + 1e-6)), (x.reshape(-1)[:1] + 0.5,)),
        "relu": lambda: ((lambda x: torch.relu(x.reshape(-1).sum() + 0 * w[:, 0].to(x.dtype))), (x.round(),)),
        "abs": lambda: ((lambda x: x.abs().sum()), (torch.zeros(shape),)),
        "kink_within_step": lambda: ((lambda x: torch.relu(x - kink_at) * 3 + x), (torch.tensor(1.0),)),
        "nan": lambda: ((lambda x: torch.stack([x.sum(), torch.log(-x.abs().sum() - 1)])), (x,)),
        "overflow": lambda: ((lambda x: torch.exp(x * 800).sum()), (x,)),
        "nondeterministic_backward": lambda: (_flaky_backward(), (x,)),
        "random": lambda: ((lambda x: (x * torch.rand(())).sum()), (x,)),
    }


def _both(factory: Factory, monkeypatch: pytest.MonkeyPatch, **options: Any) -> tuple[Any, Any, bool]:
    """The report with the tiny path and without it (each from a fresh function), and whether
    the tiny path answered."""
    answered: list[bool] = []

    def recording(ctx: Any) -> Any:
        result = tiny.run_tiny(ctx)
        answered.append(result is not None)
        return result

    monkeypatch.setattr(api, "run_tiny", recording)
    first = gc.check(*_call(factory), **options).model_dump()
    monkeypatch.setattr(tiny, "ENABLED", False)
    second = gc.check(*_call(factory), **options).model_dump()
    monkeypatch.setattr(tiny, "ENABLED", True)
    first.pop("timings")
    second.pop("timings")
    return first, second, answered == [True, False]


def _call(factory: Factory) -> tuple[Any, ...]:
    fn, inputs = factory()
    return (fn, *inputs)


OPTIONS = [
    {},
    {"error_bars": 2.5, "kinks": "fail"},
    {"atol": 1e-5, "rtol": 1e-4},
    {"check_nondeterminism": False, "max_worst": 1, "nondet_tol": 1e-2},
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("kind", list(_cases(0)))
def test_float32_tiny_reports_equal_the_column_paths(
    monkeypatch: pytest.MonkeyPatch, kind: str, seed: int, options: dict[str, Any]
) -> None:
    tiny_report, column_report, took_tiny = _both(_cases(seed)[kind], monkeypatch, **options)
    # A random fn, or one that overflows in float32 alone, is no float64 function: its
    # differences stay in float32, which the tiny path leaves to the column path.
    in_float64 = tiny_report["options"]["reference"] == "float64"
    assert in_float64 or kind in ("random", "overflow")
    assert took_tiny == in_float64
    differing = list(_differences(tiny_report, column_report))
    if kind == "random":  # every call draws new values: only the verdict must agree
        differing = [d for d in differing if ".status" in d or d.startswith(".ok") or ".notes" in d]
    assert not differing, differing[:5]


def test_the_verdicts_of_the_float32_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the cases above hold the two paths to: each kind's verdict, on the tiny path."""
    expected = {
        "square": "pass",
        "seed_square": "pass",
        "seed_sin": "pass",
        "seed_two": "pass",
        "dense": "pass",
        "affine": "pass",
        "wrong": "fail",
        "wrong_in_float64_only": "fail",
        "abs": "kink",
        "kink_within_step": "kink",
        "nan": "nonfinite",
        "nondeterministic_backward": "nondeterministic",
    }
    for kind, status in expected.items():
        report, _, took_tiny = _both(_cases(1)[kind], monkeypatch)
        assert took_tiny, kind
        assert {pair["status"] for pair in report["pairs"]} == {status}, kind
    report, _, _ = _both(_cases(1)["wrong_in_float64_only"], monkeypatch)
    (pair,) = report["pairs"]
    assert "fail only in the float64 run" in pair["message"]


@pytest.mark.parametrize(("fn", "inputs", "expected"), SEED_EXAMPLES)
def test_float32_seeds_take_the_tiny_path_and_pass(
    monkeypatch: pytest.MonkeyPatch,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[float, ...],
    expected: list[float],
) -> None:
    factory: Factory = lambda: (fn, tuple(torch.tensor(v) for v in inputs))  # noqa: E731
    report, column_report, took_tiny = _both(factory, monkeypatch)
    assert took_tiny
    assert not list(_differences(report, column_report))
    assert report["ok"] and report["dtype"] == "float32"
    assert [pair["analytic"][0] for pair in report["pairs"]] == pytest.approx(expected, abs=1e-4)


def test_float32_problems_the_tiny_path_leaves_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-finite input and forward mode go to run_full, as before."""
    for factory, options in [
        (lambda: ((lambda x: x.sum() * 2), (torch.tensor([1.0, math.inf]),)), {}),
        (lambda: ((lambda x: x**2), (torch.tensor(9.0),)), {"forward_ad": True}),
    ]:
        report, column_report, took_tiny = _both(factory, monkeypatch, **options)
        assert not took_tiny
        assert not list(_differences(report, column_report))
