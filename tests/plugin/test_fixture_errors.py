"""An error of the engine in a user's test: shown at the user's ``assert_grads`` line with the
project's own exception, not in the engine's frames; fn's own exception stays the cause."""

from __future__ import annotations

import pytest

MISBEHAVING = """
import itertools

import torch


def test_output_changes_shape(assert_grads):
    calls = itertools.count()
    assert_grads(lambda x: x.sin() if next(calls) % 2 == 0 else torch.cat([x, x]), torch.randn(3))


def test_fn_raises(assert_grads):
    def raises(x):
        raise KeyError("missing entry")
    assert_grads(raises, torch.randn(3))


def test_returns_a_float(assert_grads):
    assert_grads(lambda x: 3.0, torch.randn(3))
"""


def test_engine_errors_point_at_the_users_line_not_the_engine(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MISBEHAVING)
    result = pytester.runpytest()
    result.assert_outcomes(failed=3)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*OutputTypeError: fn's outputs changed between calls: [[]6[]] float32 here*",
            "*KeyError: 'missing entry'*",
            "*The above exception was the direct cause*",
            "*FunctionRaisedError: fn raised at the evaluation point: KeyError*",
            "*OutputTypeError: fn returned no floating-point or complex tensor (got float)*",
        ],
        consecutive=False,
    )
    # every failure's last frame is the test file's line, none in the engine
    assert "gradcheck_svc/engine/" not in out, out
    assert out.count("test_engine_errors_point_at_the_users_line_not_the_engine.py:") >= 3
