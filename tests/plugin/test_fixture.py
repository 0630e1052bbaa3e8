"""The ``assert_grads`` fixture in a user's test suite, checks run in-process."""

from __future__ import annotations

import re

import pytest

SEED_EXAMPLES = """
import pytest
import torch


def test_square_at_9(assert_grads):
    report = assert_grads(lambda x: x**2, torch.tensor(9.0))
    assert report.ok
    assert report.pairs[0].analytic == pytest.approx([18.0])


def test_scaled_sine_at_100(assert_grads):
    report = assert_grads(lambda x: torch.sin(x / 2**1.5), torch.tensor(100.0, dtype=torch.float64))
    assert report.pairs[0].analytic == pytest.approx([-0.2469], abs=1e-4)


def test_two_variables(assert_grads):
    u, v = torch.tensor(2.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    report = assert_grads(lambda u, v: u**2 + v**3 + u * v, u, v)
    assert [p.analytic for p in report.pairs] == [pytest.approx([8.0]), pytest.approx([50.0])]


def test_expression_positional(assert_grads):
    report = assert_grads("sin(x / 2**1.5)", torch.tensor(100.0, dtype=torch.float64))
    assert report.function == "sin(x / 2**1.5)"
    assert report.pairs[0].analytic == pytest.approx([-0.2469], abs=1e-4)


def test_expression_by_name(assert_grads):
    point = {"v": torch.tensor(4.0, dtype=torch.float64), "u": torch.tensor(2.0, dtype=torch.float64)}
    report = assert_grads("u**2 + v**3 + u*v", point)
    grads = {p.input: p.analytic for p in report.pairs}
    assert grads == {"u": pytest.approx([8.0]), "v": pytest.approx([50.0])}
"""

PLANTED_BUG = """
import torch


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x  # planted bug: d/dx x**3 is 3 * x**2


def test_cube(assert_grads):
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert_grads(Cube.apply, x)
"""


def test_seed_examples_pass(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_seed=SEED_EXAMPLES)
    result = pytester.runpytest()
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*= gradcheck =*", "5 checks run, 0 failed, 0 kinks seen", "where: 5 local"])


def test_planted_bug_is_caught_with_index_and_values(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_bug=PLANTED_BUG)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # The readable report names the wrong elements by index with both values:
    # d out[i] / d x[i] is 3*x (analytic, wrong) against 3*x**2 (numeric).
    result.stdout.fnmatch_lines(["E *GradientMismatch: gradcheck Cube: GRADIENT MISMATCH*", "*failed 2/9*"])
    result.stdout.re_match_lines([r"E +output\[1\] / inputs\[0\]\[1\] +6 +12 "])
    result.stdout.re_match_lines([r"E +output\[2\] / inputs\[0\]\[2\] +9 +27 "])
    assert not re.search(r"output\[0\] / inputs\[0\]\[0\]", out)  # 3*1 == 3*1**2: right there
    # The traceback ends at the user's line, not inside the plugin.
    result.stdout.fnmatch_lines([">       assert_grads(Cube.apply, x)", "E *GradientMismatch: *"])
    result.stdout.fnmatch_lines(["test_bug.py:18: GradientMismatch"])
    assert "pytest_gradcheck" not in out
    result.stdout.fnmatch_lines(["1 check run, 1 failed, 0 kinks seen"])


def test_report_is_returned_and_mismatch_is_an_assertion_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        PLANTED_BUG.replace("def test_cube", "def _unused")
        + """

def test_raises_assertion_error(assert_grads):
    import gradcheck_svc as gc
    x = torch.tensor([2.0], dtype=torch.float64)
    try:
        assert_grads(Cube.apply, x)
    except AssertionError as exc:
        assert isinstance(exc, gc.GradientMismatch)
        assert not exc.report.ok
        assert str(exc) == str(exc.report)
    else:
        raise AssertionError("no mismatch raised")


def test_returns_report(assert_grads):
    import gradcheck_svc as gc
    report = assert_grads(torch.sin, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert isinstance(report, gc.Report) and report.ok
    assert report.function == "torch.sin"


def test_input_names_label_the_report(assert_grads):
    x, w = torch.tensor([0.5, 1.5], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64)
    report = assert_grads(lambda x, w: x * w, x, w, input_names=["x", "w"])
    assert sorted(p.input for p in report.pairs) == ["w", "x"]
"""
    )
    pytester.runpytest().assert_outcomes(passed=3)


def test_kinks_are_counted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        def test_relu_at_its_kink(assert_grads):
            report = assert_grads(torch.relu, torch.tensor([0.0, 1.0], dtype=torch.float64))
            assert report.kinks == 1
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["1 check run, 0 failed, 1 kink seen (in 1 check)"])


def test_errors_from_the_engine_propagate(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        def test_unknown_option(assert_grads):
            assert_grads(torch.sin, torch.tensor(1.0), atoll=1e-3)

        def test_wrong_number_of_inputs(assert_grads):
            assert_grads("u * v", torch.tensor(1.0))
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*TypeError: unknown gradcheck option(s) 'atoll' in the assert_grads call*",
            "*BindingError: expression 'u * v' takes 2 input(s) (u, v), got 1*",
        ],
        consecutive=False,
    )


def test_no_summary_without_checks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "= gradcheck =" not in result.stdout.str()
