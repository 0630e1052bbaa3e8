"""Fast mode on Python floats reports what fast mode on tensors reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from corpus import CASES, make_inputs
from fast_paths import reports_with_and_without
from test_tiny import _differences, _problem

from gradcheck_svc.engine import fast_floats, probes

D = torch.float64


def _both(
    monkeypatch: pytest.MonkeyPatch, fn: Callable[..., torch.Tensor], inputs: tuple[Any, ...], **options: Any
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The fast-mode report on floats and on tensors, and whether the float path answered."""
    return reports_with_and_without(monkeypatch, fast_floats, "run_fast_on_floats", fn, inputs, **options)


@pytest.mark.parametrize("seed", range(80))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"error_bars": 2.5, "kinks": "fail", "projections": 3},
        {"projections": 5, "check_nondeterminism": False},
    ],
)
def test_small_problems_report_the_same_on_floats(
    monkeypatch: pytest.MonkeyPatch, seed: int, options: dict[str, Any]
) -> None:
    kind, fn, inputs = _problem(seed)
    on_floats, on_tensors, took_floats = _both(monkeypatch, fn, inputs, **options)
    differing = list(_differences(on_floats, on_tensors))
    if kind == "random":  # every call draws new values: only the verdict must agree
        differing = [d for d in differing if ".status" in d or d.startswith(".ok") or ".notes" in d]
    assert not differing, differing[:5]
    if kind in ("square", "sin", "two") and not inputs[0].shape and "projections" not in options:
        assert took_floats


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_planted_bugs_get_the_same_verdicts_on_floats(monkeypatch: pytest.MonkeyPatch, case: Any) -> None:
    """Several leaves, wrong backwards: every pair reported alike, re-check in full included."""
    for bug in ("none", *case.bugs):
        for seed in range(3):
            inputs = make_inputs(case, seed, D, shape=(2, 2))
            on_floats, on_tensors, took_floats = _both(monkeypatch, case.bound(bug), inputs, seed=seed)
            assert took_floats
            assert not list(_differences(on_floats, on_tensors)), (bug, seed)
            if bug != "none":
                assert not on_floats["ok"], (bug, seed)


def test_the_seeds_take_the_float_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for fn, inputs in [
        (lambda x: x**2, (torch.tensor(9.0, dtype=D),)),
        (lambda x: torch.sin(x / 2**1.5), (torch.tensor(100.0, dtype=D),)),
        (lambda u, v: u * v + u**2 + v**3, (torch.tensor(2.0, dtype=D), torch.tensor(4.0, dtype=D))),
    ]:
        on_floats, on_tensors, took_floats = _both(monkeypatch, fn, inputs)
        assert took_floats
        assert not list(_differences(on_floats, on_tensors))
        assert on_floats["ok"]
        assert [p["mode"] for p in on_floats["pairs"]] == ["fast"] * len(inputs)


def test_float32_and_larger_problems_stay_on_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=D) for s in ((4, 16), (8, 16), (8,)))
    for fn, inputs in [
        (F.linear, (x, w, b)),  # three leaves of 32 outputs: fast_batched.py
        (lambda x: x**2, (torch.tensor(9.0),)),  # float32: the numeric side is a float64 copy
        (torch.tanh, (torch.linspace(-1, 1, 300, dtype=D),)),
    ]:
        on_floats, on_tensors, took_floats = _both(monkeypatch, fn, inputs)
        assert not took_floats
        assert not list(_differences(on_floats, on_tensors))


@pytest.mark.parametrize("n", [1, 7, 16, 17, 64, 200])
def test_directions_drawn_as_floats_equal_the_tensor_draws(n: int) -> None:
    """Both ways of drawing directions give the same values from the same generator state,
    non-finite elements (not moved) and large magnitudes included."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=D) * 10.0 ** torch.arange(
        n
    ).remainder(9)
    x[n // 2] = math.inf if n > 1 else x[0]
    x[-1] = math.nan if n > 2 else x[-1]
    for count in (1, 3):
        as_floats = probes.random_direction_rows(x.tolist(), count, torch.Generator().manual_seed(5))
        as_tensor = probes.random_directions(x, count, torch.Generator().manual_seed(5))
        assert as_tensor.tolist() == as_floats
        assert as_tensor.abs().min() >= 0.5 or not bool(torch.isfinite(x).all())


def test_directions_of_several_leaves_side_by_side_equal_each_drawn_alone() -> None:
    leaves = [torch.tensor(3.0, dtype=D), torch.randn(4, 5, dtype=D) * 100, torch.randn(7).float()]
    leaves[1][0, 0] = -math.inf
    kept = [t.clone() for t in leaves]
    for count in (1, 2):
        alone = torch.Generator().manual_seed(1)
        each = [probes.random_directions(t.reshape(-1), count, alone) for t in leaves]
        together = probes.random_directions_of(leaves, count, torch.Generator().manual_seed(1))
        assert torch.equal(together, torch.cat(each, dim=1))
    assert all(torch.equal(a, b) for a, b in zip(leaves, kept, strict=True))  # the inputs are left alone
