"""Fast mode when a random direction crosses a kink within the step.

One projection sums every element's term: an element whose kink (a relu input near 0, a sparsemax
support boundary) lies between x - h and x + 2h along the direction makes the one-sided
differences of the whole projection jump, and its error bar spans the jump, wide enough to hide a
wrong backward elsewhere. Such a kink is an accident of the step, so fast mode takes the same
directions again with a smaller step; a kink at the point itself (relu at exactly 0) stays a kink.
"""

from __future__ import annotations

import pytest
import torch
from corpus import CASES, make_inputs

import gradcheck_svc as gc
from gradcheck_svc.engine import fast
from gradcheck_svc.report import Status


class LeakyScaled(torch.autograd.Function):
    """relu(x) * w with a backward 1% off for the elements above 0 (``bug``)."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.relu(x) * 3.0

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = g * 3.0 * (x > 0)
        return (grad * 1.01 if ctx.bug else grad), None


def _near_kink(n: int, seed: int) -> torch.Tensor:
    """Inputs away from 0 but one, within the step of its kink."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    x[n // 2] = 1e-6  # relu's kink between x - h and x + h (h ~ 1.5e-5)
    return x


@pytest.fixture
def without_retry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fast, "_ROUGH_EPS", 0.0)  # no numeric side is that precise: never retried
    # nor taken again without the kinked output elements
    monkeypatch.setattr(fast, "_without_kinked_outputs", lambda ctx, reports, failing: (reports, failing))


def test_a_kink_within_the_step_no_longer_hides_a_wrong_backward() -> None:
    for seed in range(5):
        x = _near_kink(40, seed)
        wrong = gc.check(lambda x: LeakyScaled.apply(x, True), x, mode="fast", seed=seed)
        right = gc.check(lambda x: LeakyScaled.apply(x, False), x, mode="fast", seed=seed)
        assert not wrong.ok, wrong
        assert right.ok, right
        assert any("crossed a kink within the step" in note for note in right.notes)


def test_without_the_retry_the_kink_hides_it(without_retry: None) -> None:
    hidden = 0
    for seed in range(5):
        x = _near_kink(40, seed)
        hidden += gc.check(lambda x: LeakyScaled.apply(x, True), x, mode="fast", seed=seed).ok
    assert hidden  # the retry is what catches it above


def test_relu_at_exactly_zero_is_still_a_kink() -> None:
    x = torch.rand(40, dtype=torch.float64) + 0.5
    x[7] = 0.0
    for seed in range(3):
        report = gc.check(lambda x: LeakyScaled.apply(x, False), x, mode="fast", seed=seed)
        (pair,) = report.pairs
        assert report.ok and pair.status == Status.KINK and pair.kinks == 1, report
        assert any("the kink is at the point" in note for note in report.notes)
        strict = gc.check(lambda x: LeakyScaled.apply(x, False), x, mode="fast", seed=seed, kinks="fail")
        assert not strict.ok


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_wise_kinks_over_many_seeds(dtype: torch.dtype) -> None:
    """sparsemax's support boundaries: every planted bug caught, every correct twin passing."""
    case = next(c for c in CASES if c.name == "sparsemax")
    for seed in range(40, 70):
        inputs = make_inputs(case, seed, dtype, (12, 8))
        assert gc.check(case.bound(), *inputs, seed=seed, mode="fast").ok, seed
        for bug in case.bugs:
            assert not gc.check(case.bound(bug), *inputs, seed=seed, mode="fast").ok, (bug, seed)
