"""A sample of the Functions modelled on public code (tests/engine/corpus_wild*.py) checked
through the ``assert_grads`` fixture in a user's test file: correct ones pass in float64 and
float32, a planted bug raises GradientMismatch."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS_DIR = Path(__file__).resolve().parents[1] / "engine"

FIXTURE_SAMPLE = """
import pytest
import torch
from corpus_wild import WILD_CASES, make_wild_inputs
from corpus_wild2 import WILD_CASES_2

import gradcheck_svc as gc

SAMPLE = {c.name: c for c in WILD_CASES + WILD_CASES_2 if c.name in NAMES}


@pytest.mark.parametrize("name", sorted(SAMPLE))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_correct(assert_grads, name, dtype):
    case = SAMPLE[name]
    assert assert_grads(case.bound(), *make_wild_inputs(case, 3, dtype)).ok


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_bug(assert_grads, name):
    case = SAMPLE[name]
    with pytest.raises(gc.GradientMismatch):
        assert_grads(case.bound(case.bugs[0]), *make_wild_inputs(case, 3, torch.float32))
"""


def test_a_sample_through_the_pytest_fixture(pytester: pytest.Pytester) -> None:
    names = ("entmax15", "vocab_cross_entropy", "rotary", "linear_function", "softmax_with_lse")
    names += ("chamfer", "complex_multiply", "weight_standardization", "inplace_elu", "polar")
    pytester.syspathinsert(CORPUS_DIR)
    pytester.makepyfile(test_wild=FIXTURE_SAMPLE.replace("NAMES", repr(names)))
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=3 * len(names))
    result.stdout.fnmatch_lines([f"{3 * len(names)} checks run, {len(names)} failed, *"])
