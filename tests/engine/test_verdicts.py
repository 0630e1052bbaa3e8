"""Verdicts in low precision, in fast and auto mode, and the details of the report that carry them.

The corpus (corpus.py) holds correct custom Functions and planted-bug twins; the full measurement
over many seeds is benchmarks/bench_verdicts.py. These tests run a few seeds of each.
"""

from __future__ import annotations

import pytest
import torch
from corpus import CASES, TanhGelu, make_inputs
from planted import MatVec, Square

import gradcheck_svc as gc

SEEDS = range(3)
BUGGY = [(case, bug) for case in CASES for bug in case.bugs]


def _gelu(bug: str = "none"):
    return lambda x, b: TanhGelu.apply(x, b, bug)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_correct_float32_code_passes(case, seed):
    report = gc.check(case.bound(), *make_inputs(case, seed, torch.float32))
    assert report.ok, str(report)
    assert report.options["reference"] == "float64"


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize(("case", "bug"), BUGGY, ids=lambda v: getattr(v, "name", v))
def test_every_planted_bug_is_caught_in_float32(case, bug, mode):
    for seed in (0, 1):
        report = gc.check(case.bound(bug), *make_inputs(case, seed, torch.float32), mode=mode, seed=seed)
        assert not report.ok, f"seed {seed}: {report}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["full", "fast"])
def test_half_precision_corpus(dtype, mode):
    """No false alarm in half precision; the gross bugs are caught in both modes (a 1% error
    in one term is below bfloat16's resolution at some points: see bench_verdicts.py)."""
    for case in CASES:
        inputs = make_inputs(case, 0, dtype)
        assert gc.check(case.bound(), *inputs, mode=mode).ok, case.name
        for bug in ("sign", "dropped_factor", "transposed", "broadcast"):
            if bug in case.bugs:
                assert not gc.check(case.bound(bug), *inputs, mode=mode).ok, (case.name, bug)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 30.0, 1e3])
def test_float32_gelu_at_tiny_large_and_saturating_magnitudes(scale):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 6, generator=g) * scale).float()
    b = torch.randn(6, generator=g).float()
    assert gc.check(_gelu(), x, b).ok
    assert not gc.check(_gelu("one_percent"), x, b).ok or scale >= 30.0  # saturated: no second term


def test_float32_gelu_deep_in_saturation():
    """Where the float32 forward is flat (x ~ -5), in-dtype differences read 0; float64 does not."""
    x = torch.linspace(-6, -4, 24).reshape(4, 6)
    b = torch.zeros(6)
    report = gc.check(_gelu(), x, b)
    assert report.ok, str(report)
    assert not gc.check(_gelu("dropped_factor"), x, b).ok


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("bug", ["sign", "factor", "scale1pct", "negative_only", "drop_one"])
def test_planted_square_bugs_caught_in_float32_fast_and_full(bug, mode):
    x = torch.randn(50, dtype=torch.float64).float() + 0.5
    assert not gc.check(lambda x: Square.apply(x, bug), x, mode=mode).ok


def test_transposed_matvec_caught_in_float32_fast_mode():
    w, x = torch.randn(6, 6), torch.randn(6)
    assert not gc.check(lambda w, x: MatVec.apply(w, x, True), w, x, mode="fast").ok


def test_auto_says_when_it_picks_fast_and_still_catches():
    x, b = torch.randn(12, 8), torch.randn(8)
    report = gc.check(_gelu("dropped_factor"), x, b, fast_threshold=100)
    assert report.mode == "fast" and not report.ok
    assert any("chose fast mode" in note for note in report.notes)
    assert {p.mode for p in report.pairs} == {"full"}  # failing pairs re-checked element by element
    passing = gc.check(_gelu(), x, b, fast_threshold=100)
    assert passing.ok and any("chose fast mode" in note for note in passing.notes)
    assert not any("chose fast mode" in note for note in gc.check(_gelu(), x, b).notes)


def test_bug_hidden_by_bfloat16_rounding_is_reported_from_the_float64_run():
    case = CASES[0]
    report = gc.check(case.bound("dropped_factor"), *make_inputs(case, 0, torch.bfloat16))
    assert not report.ok
    assert any("float64 run" in p.message for p in report.pairs if not p.ok)


def test_fn_that_casts_inside_falls_back_to_in_dtype_differences():
    report = gc.check(lambda x: torch.sin(x.float()) * 2, torch.randn(5))
    assert report.ok and report.options["reference"] == "float32"
    assert any("finite differences in float32" in n and "returns float32" in n for n in report.notes)


def test_fn_that_fails_in_float64_falls_back_and_says_why():
    w = torch.randn(4, 4)
    report = gc.check(lambda x: torch.tanh(w @ x), torch.randn(4))
    assert report.ok and report.options["reference"] == "float32"
    assert any("does not run on float64 copies" in n for n in report.notes)


class _TanhOffByOnePercent(torch.autograd.Function):
    """tanh whose backward is 1% off at one element (when ``bug``)."""

    @staticmethod
    def forward(ctx, x, bug):
        ctx.save_for_backward(x)
        ctx.bug = bug
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        d = 1 - torch.tanh(x) ** 2
        if ctx.bug:
            d = d.clone()
            d[7] *= 1.01
        return g * d, None


@pytest.mark.parametrize("seed", range(5))
def test_float32_differences_resolve_a_one_percent_error(seed):
    # A float32 constant in the closure keeps fn off float64 copies: the differences are float32,
    # with a step large enough that their noise stays well below a 1% error.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 40, generator=g) / 40**0.5
    x = torch.randn(40, generator=g) * 2
    x[7] = 0.3  # where tanh' is not tiny, so the 1% is 1% of a sizeable column
    correct = gc.check(lambda x: w @ _TanhOffByOnePercent.apply(x, False), x)
    assert correct.ok and correct.options["reference"] == "float32", str(correct)
    wrong = gc.check(lambda x: w @ _TanhOffByOnePercent.apply(x, True), x)
    assert not wrong.ok
    assert {tuple(el.input_index) for p in wrong.pairs for el in p.worst if not el.kink} == {(7,)}


def test_float64_inputs_need_no_reference_note():
    report = gc.check(lambda x: x**2, torch.tensor(9.0, dtype=torch.float64))
    assert report.ok and report.options["reference"] == "float64"
    assert not any("finite differences" in n for n in report.notes)


def test_module_parameters_get_the_float64_reference():
    torch.manual_seed(0)
    report = gc.check(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh()), torch.randn(3, 6))
    assert report.ok and report.options["reference"] == "float64"


class _GrowingError(torch.autograd.Function):
    """x**2 with an error that grows with the element's position, and abs kinks at 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x.abs()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        wrong = torch.linspace(1.0, 2.0, x.numel(), dtype=x.dtype)
        return grad * 2 * x.abs() * wrong


def test_worst_elements_are_ordered_by_err_over_tol():
    x = torch.rand(40, dtype=torch.float64) + 0.5
    (pair,) = gc.check(_GrowingError.apply, x).pairs
    ratios = [el.abs_error / el.tolerance for el in pair.worst]
    assert ratios == sorted(ratios, reverse=True)
    assert pair.worst[0].input_index == [39]
    assert ratios[0] == pytest.approx(pair.max_error_ratio)


def test_failures_are_listed_before_kinks():
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    (pair,) = gc.check(lambda x: _GrowingError.apply(x) + x.abs(), x).pairs
    assert pair.elements_failed == 3 and pair.kinks >= 3
    assert [el.kink for el in pair.worst] == [False] * len(pair.worst)


class _ConstantWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_zero_numeric_prints_no_absurd_relative_error():
    report = gc.check(_ConstantWithGradient.apply, torch.ones(3, dtype=torch.float64))
    (pair,) = report.pairs
    assert not pair.ok and pair.max_rel_error == 0.0
    assert all(el.tolerance == 0.0 for el in pair.worst)
    text = str(report)
    assert "e+307" not in text and "e-308" not in text
    assert "n/a (numeric 0)" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_bars_below_one_do_not_make_smooth_elements_kinks(dtype):
    report = gc.check(lambda x: x**2, torch.tensor(9.0, dtype=dtype), error_bars=0.5, kinks="fail")
    assert report.ok, str(report)
    assert report.kinks == 0


def test_nan_input_is_nonfinite_not_nondeterministic():
    report = gc.check(lambda x: x * 2, torch.tensor([1.0, float("nan")], dtype=torch.float64))
    statuses = {p.status for p in report.pairs}
    assert gc.Status.NONDETERMINISTIC not in statuses
    assert statuses == {gc.Status.NONFINITE}


def test_taylor_and_second_order_keep_in_dtype_differences_and_say_so():
    x = torch.randn(4)
    taylor = gc.check(torch.tanh, x, scheme="taylor")
    second = gc.check(torch.tanh, x, order=2)
    for report in (taylor, second):
        assert report.ok, str(report)
        assert any("finite differences in float32" in n for n in report.notes)
