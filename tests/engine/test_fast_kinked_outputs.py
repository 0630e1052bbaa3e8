"""Fast mode when some output elements sit at a kink among thousands of smooth ones.

A projection sums every output element's differences: a few relu/abs inputs within the step of
their corner (here closer to it than even the smaller retry step reaches) widen its error bar past
a wrong backward anywhere else, which the default options (fast mode above ``fast_threshold``)
then passed. Fast mode now takes the same directions again with those output elements' cotangents
set to 0: a projection of smooth elements only, which shows the wrong backward.
"""

from __future__ import annotations

import pytest
import torch
from corpus_kinky import KINKY_CASES

import gradcheck_svc as gc
from gradcheck_svc.engine import fast

_CASES = {case.name: case for case in KINKY_CASES}


def _kinked_at(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random normal inputs with their first row's first eight elements within 5e-6 of 0 (both
    the default step, ~1.5e-5, and the retry's, ~5e-7, cross the corner there) and the element
    the one-element twins change (the middle one) well above 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[0, :8] = torch.tensor([1e-6, -2e-6, 3e-7, -1e-7, 4e-6, 2e-6, -3e-6, 1e-6], dtype=torch.float64)
    middle = x.view(-1)[x.numel() // 2]
    x.view(-1)[x.numel() // 2] = middle.abs() + 0.5
    return x


@pytest.mark.parametrize(
    ("name", "bug"),
    [("relu", "one_percent_all"), ("leaky_relu", "one_percent_element"), ("abs", "one_percent_element")],
)
def test_a_few_kinked_outputs_no_longer_hide_a_wrong_backward(name: str, bug: str) -> None:
    case = _CASES[name]
    for seed in range(2):
        x = _kinked_at((32, 32), seed)
        wrong = gc.check(case.bound(bug), x, mode="fast", seed=seed)
        right = gc.check(case.bound(), x, mode="fast", seed=seed)
        assert not wrong.ok, wrong
        assert right.ok, right


def test_the_default_options_on_a_large_input_catch_it() -> None:
    x = _kinked_at((64, 64), 3)
    report = gc.check(_CASES["leaky_relu"].bound("one_percent_element"), x)
    assert report.mode == "fast"
    assert not report.ok, report
    assert gc.check(_CASES["leaky_relu"].bound(), x).ok


def test_the_elements_left_out_are_the_kinked_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _kinked_at((32, 32), 0)
    captured: list[torch.Tensor] = []
    original = fast._without_kinked_outputs

    def spy(ctx, reports, failing):
        found = fast.kinked_outputs(ctx)
        assert found is not None
        captured.append(found)
        return original(ctx, reports, failing)

    monkeypatch.setattr(fast, "_without_kinked_outputs", spy)
    assert gc.check(_CASES["abs"].bound(), x, mode="fast", seed=0).ok
    assert captured
    flagged = set(captured[0].nonzero().view(-1).tolist())
    assert flagged and flagged <= set(range(8)), flagged
