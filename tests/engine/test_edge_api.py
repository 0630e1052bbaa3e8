"""What the caller controls: wrt=, expect="mismatch", fn_kwargs, and errors for misuse."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.errors import CheckError, InvalidOptionError
from gradcheck_svc.report import Status

D = torch.float64


class WrongScale(torch.autograd.Function):
    """x * s with the gradient for s off by 10%: a bug only a check of s can see."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        return grad * s, grad * x * 1.1


class ScaledLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, dtype=D))
        self.scale = torch.nn.Parameter(torch.randn(3, dtype=D))
        self.register_buffer("offset", torch.randn(3, dtype=D))

    def forward(self, x):
        return WrongScale.apply(x @ self.weight.T, self.scale) + self.offset


# ----------------------------------------------------------------------------- wrt


def test_wrt_selects_one_module_parameter():
    module, x = ScaledLinear(), torch.randn(2, 4, dtype=D)
    report = gc.check(module, x, wrt="weight")
    assert [p.input for p in report.pairs] == ["weight"]
    assert report.ok, str(report)
    caught = gc.check(module, x, wrt=["weight", "scale"])
    assert {p.input for p in caught.pairs} == {"weight", "scale"}
    assert [p.input for p in caught.failures] == ["scale"]


def test_wrt_parameters_selects_every_parameter_and_no_buffer_or_input():
    report = gc.check(ScaledLinear(), torch.randn(2, 4, dtype=D), wrt="parameters")
    assert {p.input for p in report.pairs} == {"weight", "scale"}
    assert not report.ok


def test_wrt_nested_path_position_and_name():
    def fn(x, d):
        return WrongScale.apply(x, d["scale"]) + d["shift"]

    x = torch.randn(3, dtype=D)
    d = {"scale": torch.randn(3, dtype=D), "shift": torch.randn(3, dtype=D)}
    only_x = gc.check(fn, x, d, wrt=0)
    assert [p.input for p in only_x.pairs] == ["inputs[0]"] and only_x.ok
    scale = gc.check(fn, x, d, wrt='inputs[1]["scale"]')
    assert [p.input for p in scale.pairs] == ["inputs[1]['scale']"] and not scale.ok
    below = gc.check(fn, x, d, wrt="inputs[1]")
    assert {p.input for p in below.pairs} == {"inputs[1]['scale']", "inputs[1]['shift']"}
    named = gc.check(fn, x, d, input_names=["x", "d"], wrt="x")
    assert [p.input for p in named.pairs] == ["x"]


def test_wrt_checks_an_input_that_does_not_require_grad():
    x = torch.randn(3, dtype=D, requires_grad=True)
    s = torch.randn(3, dtype=D)  # not requiring grad: skipped by default
    assert gc.check(WrongScale.apply, x, s).ok
    assert not gc.check(WrongScale.apply, x, s, wrt=[0, 1]).ok


@pytest.mark.parametrize(
    ("wrt", "match"),
    [
        ("bias", "names no input or parameter; differentiable ones: inputs\\[0\\], inputs\\[1\\]"),
        ("inputs[2]", "not a floating-point or complex tensor"),
        (7, "only 3 positional inputs"),
        ([None], "expected a non-empty string"),
        (3.5, "a name or a list of names"),
    ],
)
def test_wrt_misuse_is_an_invalid_option(wrt, match):
    with pytest.raises(InvalidOptionError, match=match):
        gc.check(
            lambda x, y, n: x * y * n,
            torch.randn(2, dtype=D),
            torch.randn(2, dtype=D),
            torch.tensor(2),
            wrt=wrt,
        )


# ----------------------------------------------------------------------------- expect="mismatch"


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


@pytest.mark.parametrize("fn", [StraightThrough.apply, GradientReversal.apply], ids=["ste", "reversal"])
def test_expected_mismatch_passes_and_says_so(fn):
    x = torch.rand(6, dtype=D) + 0.1  # away from round()'s steps
    plain = gc.check(fn, x)
    assert not plain.ok
    report = gc.assert_grads(fn, x, expect="mismatch")
    assert report.ok and report.expected_mismatch
    assert any("mismatch expected" in note for note in report.notes)
    assert "ok, mismatch as expected" in str(report).splitlines()[0]


def test_expected_mismatch_fails_when_the_gradients_are_true():
    x = torch.randn(4, dtype=D)
    report = gc.check(torch.sin, x, expect="mismatch")
    assert not report.ok and not report.expected_mismatch
    assert "NO MISMATCH, ONE WAS EXPECTED" in str(report)
    with pytest.raises(gc.GradientMismatch, match="the gradients are true"):
        gc.assert_grads(torch.sin, x, expect="mismatch")


def test_expected_mismatch_does_not_excuse_a_nan_input():
    x = torch.tensor([0.3, float("nan")], dtype=D)
    report = gc.check(StraightThrough.apply, x, expect="mismatch")
    assert not report.ok
    assert any(p.status == Status.NONFINITE for p in report.pairs)


def test_expect_defaults_to_match_and_rejects_other_values():
    assert gc.check(torch.sin, torch.randn(3, dtype=D), expect="match").ok
    with pytest.raises(InvalidOptionError, match="expect='sometimes'"):
        gc.check(torch.sin, torch.randn(3, dtype=D), expect="sometimes")


# ----------------------------------------------------------------------------- fn_kwargs, params, misuse


def test_fn_kwargs_reach_fn_through_assert_grads():
    def scaled(x, *, scale, power=2):
        return scale * x**power

    report = gc.assert_grads(scaled, torch.tensor(9.0, dtype=D), fn_kwargs={"scale": 1.0})
    assert report.pairs[0].analytic == pytest.approx([18.0])


def test_params_on_a_callable_is_an_error_that_points_at_fn_kwargs():
    with pytest.raises(InvalidOptionError, match="fn_kwargs"):
        gc.check(torch.softmax, torch.randn(3, dtype=D), params={"dim": 0})


@pytest.mark.parametrize(
    "misuse",
    [
        {"fn_kwargs": [1]},
        {"fn_kwargs": {1: 2}},
        {"fn_kwargs": "scale"},
        {"input_names": [1]},
        {"input_names": ["x", "x"]},
        {"deadline": "soon"},
        {"cancelled": 3},
    ],
    ids=str,
)
def test_misuse_raises_a_check_error_never_a_raw_one(misuse):
    with pytest.raises(CheckError):
        gc.check(lambda x, y: x * y, torch.randn(2, dtype=D), torch.randn(2, dtype=D), **misuse)


def test_vmap_fallback_note_is_short_information():
    class OldStyle(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad

    report = gc.check(OldStyle.apply, torch.randn(5, dtype=D))
    assert report.ok
    notes = [n for n in report.notes if "vmap" in n or "torch.func" in n]
    assert notes
    for note in notes:
        assert len(note) <= 120, note
        assert "Error" not in note and "unavailable" not in note, note
        assert "without setup_context" in note
