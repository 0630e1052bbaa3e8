"""Verdicts on the Functions modelled on public code (corpus_wild.py and corpus_wild2.py), a few
seeds each.

The sweep over many seeds, shapes, dtypes and modes, with torch.autograd.gradcheck alongside,
is benchmarks/bench_wild.py.
"""

from __future__ import annotations

import pytest
import torch
from corpus_wild import WILD_CASES, GradMultiply, make_wild_inputs
from corpus_wild2 import WILD_CASES_2

import gradcheck_svc as gc

CASES = WILD_CASES + WILD_CASES_2
BUGGY = [(case, bug) for case in CASES for bug in case.bugs]
# Seeds at which every planted bug changes the backward at the point (entmax's 1% on row 0 is
# invisible where that row's support is one element: its gradient is 0 either way).
BUG_SEEDS = (3, 7)


def _own(dtype: torch.dtype, fn):
    """``fn`` refusing other dtypes, so the finite differences stay in ``dtype``."""

    complex_dtype = torch.complex64 if dtype == torch.float32 else torch.complex128

    def call(*inputs):
        if any(
            (t.is_floating_point() and t.dtype != dtype) or (t.is_complex() and t.dtype != complex_dtype)
            for t in inputs
        ):
            raise TypeError("one dtype only")
        return fn(*inputs)

    return call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_correct_code_passes_in_the_default_mode(case, dtype):
    for seed in (0, 11):
        report = gc.check(case.bound(), *make_wild_inputs(case, seed, dtype), seed=seed)
        assert report.ok, f"seed {seed}: {report}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_correct_code_passes_fast_and_in_its_own_float32(case):
    inputs = make_wild_inputs(case, 5, torch.float32, (16, 12))
    assert gc.check(case.bound(), *inputs, mode="fast", seed=5).ok
    assert gc.check(_own(torch.float32, case.bound()), *make_wild_inputs(case, 5, torch.float32)).ok


@pytest.mark.parametrize(("case", "bug"), BUGGY, ids=lambda v: getattr(v, "name", v))
def test_every_planted_bug_is_caught_in_the_default_mode(case, bug):
    for seed in BUG_SEEDS:
        for dtype in (torch.float64, torch.float32):
            report = gc.check(case.bound(bug), *make_wild_inputs(case, seed, dtype), seed=seed)
            assert not report.ok, f"{dtype} seed {seed}: {report}"


@pytest.mark.parametrize(("case", "bug"), BUGGY, ids=lambda v: getattr(v, "name", v))
def test_every_planted_bug_is_caught_in_fast_mode(case, bug):
    inputs = make_wild_inputs(case, BUG_SEEDS[0], torch.float32, (16, 12))
    assert not gc.check(case.bound(bug), *inputs, mode="fast", seed=1).ok


def test_gradient_reversal_is_a_mismatch_that_expect_mismatch_accepts():
    """DANN's reversal layer is meant to disagree with its forward: expect="mismatch" passes it."""
    x = torch.randn(4, 3, dtype=torch.float64)
    reverse = lambda x: GradMultiply.apply(x, 0.5, "reversal")  # noqa: E731
    assert not gc.check(reverse, x).ok
    assert gc.check(reverse, x, expect="mismatch").ok
    assert not gc.check(lambda x: GradMultiply.apply(x, 1.0, "none"), x, expect="mismatch").ok


def test_a_one_percent_error_equal_to_the_steps_curvature_is_no_kink():
    """In float32 the step is large: on Mish at x = -4 the one-sided difference D+ is off the
    derivative by its own truncation, 1% here, and a backward 1% off landed on D+ and was taken
    for a kink inside the step. D+'s side is held to its truncation |D+(2h) - D+(h)|."""
    case = next(c for c in WILD_CASES if c.name == "mish")
    inputs = make_wild_inputs(case, 100, torch.float32)
    report = gc.check(_own(torch.float32, case.bound("one_percent_element")), *inputs, mode="full", seed=100)
    assert not report.ok, str(report)
    assert report.pairs[0].kinks == 0


@pytest.mark.parametrize("offset", [0.3, 0.5, 0.7])
def test_a_kink_inside_the_step_on_either_side_stays_a_kink_in_float32(offset):
    """|x| with the kink between x - h and x (and between x and x + h): no failure either way."""
    h = 0.0078125  # float32's step at |x| <= 1
    x = torch.tensor([offset * h, -offset * h, 0.5, -0.25], dtype=torch.float32)
    report = gc.check(_own(torch.float32, torch.abs), x, mode="full")
    assert report.ok, str(report)
