"""The fixture passes check()'s own keywords: fn_kwargs, wrt, expect (and refuses params on a callable)."""

from __future__ import annotations

import pytest

SUITE = """
import pytest
import torch

X = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64)


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


def scaled(x, *, scale):
    return scale * x**2


def test_fn_kwargs(assert_grads):
    report = assert_grads(scaled, torch.tensor(9.0, dtype=torch.float64), fn_kwargs={"scale": 1.0})
    assert report.pairs[0].analytic == pytest.approx([18.0])


def test_wrt(assert_grads):
    layer = torch.nn.Linear(3, 2).double()
    report = assert_grads(layer, X.reshape(1, 3), wrt="weight")
    assert [p.input for p in report.pairs] == ["weight"]


def test_straight_through_expected(assert_grads):
    assert_grads(StraightThrough.apply, X, expect="mismatch")


@pytest.mark.gradcheck(expect="mismatch")
def test_straight_through_by_marker(assert_grads):
    assert_grads(StraightThrough.apply, X)


def test_true_gradient_expected_to_mismatch(assert_grads):
    assert_grads(torch.sin, X, expect="mismatch")


def test_params_on_a_callable(assert_grads):
    assert_grads(scaled, X, params={"scale": 2.0})
"""


def test_check_arguments_and_expected_mismatches_in_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_check_arguments_suite=SUITE)
    result = pytester.runpytest()
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_true_gradient_expected_to_mismatch*",
            "*NO MISMATCH, ONE WAS EXPECTED*",
        ]
    )
    result.stdout.fnmatch_lines(["*TypeError: params= is for a registered function*fn_kwargs*"])
    result.stdout.fnmatch_lines(
        ["*= gradcheck =*", "6 checks run, 2 failed (1 could not run), 2 expected mismatches, 0 kinks seen"]
    )


def test_expected_mismatch_is_judged_on_a_server_report(
    pytester: pytest.Pytester, server_address: str
) -> None:
    pytester.makepyfile(
        test_expect_on_server="""
        import torch

        def test_true_gradient_on_the_server(assert_grads):
            report = assert_grads("sin(x)", torch.tensor([0.5], dtype=torch.float64), expect="mismatch")
        """
    )
    result = pytester.runpytest(f"--gradcheck-server={server_address}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*NO MISMATCH, ONE WAS EXPECTED*", f"where: 1 on {server_address}"])
