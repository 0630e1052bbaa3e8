"""Tiny checks judged on Python floats report what the column path reports."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from planted import SEED_EXAMPLES

import gradcheck_svc as gc
from gradcheck_svc.engine import api, fast, fast_floats, tiny
from gradcheck_svc.engine.numeric import Differences


class _OffByOnePercent(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.cos(x) * 1.01


KINDS = (
    "dense",
    "square",
    "sin",
    "two",
    "relu",
    "abs",
    "nan",
    "bug",
    "random",
    "affine",
    "max",
    "zero",
    "constant",
    "overflow",
)


def _problem(seed: int) -> tuple[str, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """A random small problem: smooth, kinked, non-finite, nondeterministic or wrongly differentiated."""
    g = torch.Generator().manual_seed(seed)
    r = random.Random(seed)
    kind = r.choice(KINDS)
    n = r.choice([1, 2, 3, 4, 5, 8])
    shape: tuple[int, ...] = () if n == 1 and r.random() < 0.5 else (n,)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * r.choice([1.0, 10.0, 1e-3, 1e4])
    w = torch.randn(r.choice([1, 2, 3, 5]), n, generator=g, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    problems: dict[str, Callable[[], tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]] = {
        "dense": lambda: ((lambda x: torch.tanh(w @ x.reshape(-1))), (x,)),
        "square": lambda: ((lambda x: (x**2).sum()), (x,)),
        "sin": lambda: ((lambda x: torch.sin(x / 2**1.5).sum() * x.sum()), (x,)),
        "two": lambda: (
            (lambda u, v: u * v + u**2 + v**3),
            (
                torch.randn((), generator=g, dtype=torch.float64),
                torch.randn((), generator=g, dtype=torch.float64),
            ),
        ),
        "relu": lambda: ((lambda x: torch.relu(x.reshape(-1).sum() + 0 * w[:, 0])), (x.round(),)),
        "abs": lambda: ((lambda x: x.abs().sum()), (torch.zeros(shape, dtype=torch.float64),)),
        "nan": lambda: ((lambda x: torch.stack([x.sum(), torch.log(-x.abs().sum() - 1)])), (x,)),
        "bug": lambda: ((lambda x: _OffByOnePercent.apply(x).sum()), (x,)),
        "random": lambda: ((lambda x: (x * torch.rand((), dtype=torch.float64)).sum()), (x,)),
        "affine": lambda: (
            (lambda x, b: w @ x.reshape(-1) + b),
            (x, torch.randn(w.shape[0], generator=g, dtype=torch.float64)),
        ),
        "max": lambda: ((lambda x: x.max() * one), (torch.ones(shape, dtype=torch.float64),)),
        "zero": lambda: ((lambda x: (x**3).sum() * 0), (x,)),
        "constant": lambda: ((lambda x: x.sum() * 0 + 3.0), (x,)),
        "overflow": lambda: ((lambda x: torch.exp(x * 800).sum()), (x,)),
    }
    fn, inputs = problems[kind]()
    return kind, fn, inputs


def _differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Where two dumped reports differ; floats may differ in their last few bits (see tiny.py)."""
    if a is None or b is None:
        if a is not b:
            yield f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        if a.keys() != b.keys():
            yield f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a.keys() & b.keys():
            yield from _differences(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items != {len(b)}"
        for k, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from _differences(x, y, f"{path}[{k}]")
    elif isinstance(a, float) and isinstance(b, float):
        if not (math.isclose(a, b, rel_tol=1e-13, abs_tol=1e-300) or (math.isnan(a) and math.isnan(b))):
            yield f"{path}: {a!r} != {b!r}"
    elif a != b:
        yield f"{path}: {a!r} != {b!r}"


def _both(
    monkeypatch: pytest.MonkeyPatch,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The report with the tiny path and without it, and whether the tiny path answered."""
    answered: list[bool] = []

    def recording(ctx: Any) -> Any:
        result = tiny.run_tiny(ctx)
        answered.append(result is not None)
        return result

    monkeypatch.setattr(api, "run_tiny", recording)
    first = gc.check(fn, *inputs, **options).model_dump()
    monkeypatch.setattr(tiny, "ENABLED", False)
    second = gc.check(fn, *inputs, **options).model_dump()
    monkeypatch.setattr(tiny, "ENABLED", True)
    first.pop("timings")
    second.pop("timings")
    return first, second, answered == [True, False]


@pytest.mark.parametrize("seed", range(120))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"error_bars": 2.5, "kinks": "fail"},
        {"atol": 1e-9, "rtol": 1e-6},
        {"order": 2},
        {"check_nondeterminism": False, "max_worst": 1, "eps": 1e-4, "nondet_tol": 1e-3},
    ],
)
def test_tiny_reports_equal_the_column_paths(
    monkeypatch: pytest.MonkeyPatch, seed: int, options: dict[str, Any]
) -> None:
    kind, fn, inputs = _problem(seed)
    tiny_report, column_report, took_tiny = _both(monkeypatch, fn, inputs, **options)
    differing = list(_differences(tiny_report, column_report))
    if kind == "random":  # every call draws new values: only the verdict must agree
        differing = [d for d in differing if ".status" in d or d.startswith(".ok") or ".notes" in d]
    assert not differing, differing[:5]
    if kind in ("square", "two", "sin", "constant", "overflow", "bug") and not inputs[0].shape:
        assert took_tiny  # scalar problems take the tiny path


@pytest.mark.parametrize(("fn", "inputs", "expected"), SEED_EXAMPLES)
def test_seeds_take_the_tiny_path_and_pass(
    monkeypatch: pytest.MonkeyPatch,
    fn: Callable[..., torch.Tensor],
    inputs: tuple[float, ...],
    expected: list[float],
) -> None:
    tensors = tuple(torch.tensor(v, dtype=torch.float64) for v in inputs)
    tiny_report, column_report, took_tiny = _both(monkeypatch, fn, tensors)
    assert took_tiny
    assert not list(_differences(tiny_report, column_report))
    assert tiny_report["ok"]
    got = [pair["analytic"][0] for pair in tiny_report["pairs"]]
    assert got == pytest.approx(expected, abs=1e-4)


def test_a_wrong_scalar_backward_fails_on_the_tiny_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.tensor(0.7, dtype=torch.float64)
    tiny_report, _, took_tiny = _both(monkeypatch, lambda x: _OffByOnePercent.apply(x), (x,))
    assert took_tiny
    assert not tiny_report["ok"]
    (pair,) = tiny_report["pairs"]
    assert pair["status"] == "fail" and pair["worst"][0]["analytic"] == pytest.approx(1.01 * math.cos(0.7))


def test_problems_the_tiny_path_leaves_to_the_column_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Elementwise vectors (colouring) and forward mode go on as before (float32 with its float64
    reference: test_tiny_wide.py)."""
    vector = torch.linspace(-1, 1, 12, dtype=torch.float64)
    for fn, inputs, options in [
        (torch.tanh, (vector,), {}),
        (lambda x: x**2, (torch.tensor(9.0, dtype=torch.float64),), {"forward_ad": True}),
    ]:
        tiny_report, column_report, took_tiny = _both(monkeypatch, fn, inputs, **options)
        assert not took_tiny
        assert not list(_differences(tiny_report, column_report))


@pytest.mark.parametrize("theta", [0.05, 0.2, 0.35, 0.5, 0.6, 0.9])
@pytest.mark.parametrize("options", [{}, {"kinks": "fail"}])
def test_a_kink_inside_the_step_is_a_kink_on_the_tiny_path(
    monkeypatch: pytest.MonkeyPatch, theta: float, options: dict[str, Any]
) -> None:
    """A kink between x and x + 2h spoils D+ and D+(2h) alike; the column path tells it by the
    analytic value sitting on D- (``compare._kinks_within_step``), and so must the tiny path."""
    at = 1 + theta * 2.0**-16  # the step at x = 1

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - at) * 3 + x

    tiny_report, column_report, took_tiny = _both(
        monkeypatch, fn, (torch.tensor(1.0, dtype=torch.float64),), **options
    )
    assert took_tiny
    assert not list(_differences(tiny_report, column_report))
    if 0.2 <= theta <= 0.6:
        (pair,) = tiny_report["pairs"]
        assert pair["status"] == ("fail" if options else "kink") and pair["kinks"] == 1


@pytest.mark.parametrize("seed", range(80))
@pytest.mark.parametrize("options", [{}, {"error_bars": 2.5, "kinks": "fail", "projections": 3}])
def test_fast_mode_judged_on_floats_reports_what_tensors_report(
    monkeypatch: pytest.MonkeyPatch, seed: int, options: dict[str, Any]
) -> None:
    kind, fn, inputs = _problem(seed)
    monkeypatch.setattr(fast_floats, "ENABLED", False)  # the tensor path, judged on floats
    on_floats = gc.check(fn, *inputs, mode="fast", **options).model_dump()

    def on_tensors(
        ctx: Any,
        block: Any,
        leaf: Any,
        a: list[float],
        parts: list[list[float]],
        scale: list[float],
        nondet: float,
    ) -> Any:
        analytic, terms = torch.tensor([a], dtype=torch.float64), torch.tensor(scale, dtype=torch.float64)
        projected = Differences(*(torch.tensor([part], dtype=torch.float64) for part in parts))
        return fast._judged(ctx, block, leaf, analytic, projected, terms, None, None, nondet)

    monkeypatch.setattr(fast, "judged_on_floats", on_tensors)
    monkeypatch.setattr(fast, "_FLOAT_ENTRIES", 0)  # the differences on tensors too
    tensors = gc.check(fn, *inputs, mode="fast", **options).model_dump()
    on_floats.pop("timings")
    tensors.pop("timings")
    differing = list(_differences(on_floats, tensors))
    if kind == "random":
        differing = [d for d in differing if ".status" in d or d.startswith(".ok") or ".notes" in d]
    assert not differing, differing[:5]
