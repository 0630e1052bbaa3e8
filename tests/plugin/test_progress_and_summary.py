"""Long checks show progress under -v (not under xdist workers); the summary lists all under -v."""

from __future__ import annotations

import pytest

# Shown from the first column on, so the test needs no slow check (the threshold is a setting).
NO_DELAY = """
import pytest
import pytest_gradcheck.progress as progress


@pytest.fixture(autouse=True)
def _no_delay(monkeypatch):
    monkeypatch.setattr(progress, "AFTER_SECONDS", 0.0)
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)
"""

# A dense Jacobian, so the check goes column chunk by column chunk (an elementwise one would be
# checked by grouped perturbations in one batch).
CHECKS = """
import torch
from torch.nn.functional import softmax

def test_wide(assert_grads):
    assert_grads(softmax, torch.randn(64, dtype=torch.float64), 0, mode="full", chunk_size=16)
"""


def test_progress_lines_under_verbose(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NO_DELAY)
    pytester.makepyfile(test_wide=CHECKS)
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "gradcheck: test_wide.py::test_wide *softmax [[]#####...............[]] 16/64 columns, * s",
            "gradcheck: test_wide.py::test_wide *softmax [[]####################[]] 64/64 columns, * s",
            "test_wide.py::test_wide PASSED*",
        ]
    )


def test_no_progress_without_verbose(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NO_DELAY)
    pytester.makepyfile(test_wide=CHECKS)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "columns" not in result.stdout.str()


def test_xdist_workers_stay_silent(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NO_DELAY)
    pytester.makepyfile(test_wide=CHECKS + CHECKS.replace("test_wide", "test_wide_again"))
    result = pytester.runpytest_subprocess("-v", "-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=2)
    assert "columns" not in result.stdout.str()
    result.stdout.fnmatch_lines(["2 checks run, 0 failed, 0 kinks seen"])


FALLBACKS = """
import pytest
import torch

@pytest.mark.parametrize("i", range(8))
def test_closure(assert_grads, i):
    assert_grads(lambda x: x * i, torch.tensor(2.0, dtype=torch.float64))
"""


def test_verbose_lists_every_fallback(pytester: pytest.Pytester, server_address: str) -> None:
    pytester.makepyfile(test_many=FALLBACKS)
    quiet = pytester.runpytest(f"--gradcheck-server={server_address}")
    quiet.stdout.fnmatch_lines(["  ... and 3 more (-v lists them all)"])
    verbose = pytester.runpytest(f"--gradcheck-server={server_address}", "-v")
    listed = [line for line in verbose.stdout.lines if line.startswith("  test_many.py::test_closure[")]
    assert len(listed) == 8
    assert "more" not in verbose.stdout.str()


def test_slowest_leaves_out_the_warm_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import torch

        def test_first(assert_grads):
            assert_grads(torch.sin, torch.tensor(1.0, dtype=torch.float64))

        def test_second(assert_grads):
            assert_grads(torch.cos, torch.tensor(1.0, dtype=torch.float64))
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        ["slowest: * s test_slowest_leaves_out_the_warm_up.py::test_second (torch.cos, local)"]
    )


def test_a_single_check_is_labelled_as_warm_up(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import torch\n\ndef test_only(assert_grads):\n"
        "    assert_grads(torch.sin, torch.tensor(1.0, dtype=torch.float64))\n"
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        ["slowest (first check, includes warm-up): * s *::test_only (torch.sin, local)"]
    )


def test_remote_checks_stream_their_progress(pytester: pytest.Pytester, server_address: str) -> None:
    pytester.makeconftest(
        NO_DELAY
        + """
import gradcheck_svc.server.service as service


@pytest.fixture(autouse=True)
def _every_step(monkeypatch):
    monkeypatch.setattr(service, "_PROGRESS_EVERY", 0.0)
"""
    )
    pytester.makepyfile(test_wide=CHECKS)
    result = pytester.runpytest("-v", f"--gradcheck-server={server_address}", "--gradcheck-remote=require")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "gradcheck: test_wide.py::test_wide *softmax [[]#####...............[]] 16/64 columns, * s",
            "gradcheck: test_wide.py::test_wide *softmax [[]####################[]] 64/64 columns, * s",
        ]
    )
