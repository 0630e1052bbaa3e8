"""Remote mode against a real server started for the session (see ``server_address`` in conftest)."""

from __future__ import annotations

import time

import pytest

REMOTE_SUITE = """
import pytest
import torch

from plugin_sample_ops import BadCube, scaled_sine

X = torch.tensor(100.0, dtype=torch.float64)


def test_expression(assert_grads):
    report = assert_grads("sin(x / 2**1.5)", X)
    assert report.served_by == "test-replica"
    assert report.pairs[0].analytic == pytest.approx([-0.2469], abs=1e-4)


def test_expression_by_name(assert_grads):
    u, v = torch.tensor(2.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    report = assert_grads("u**2 + v**3 + u*v", {"v": v, "u": u})
    assert report.served_by == "test-replica"
    grads = {p.input: p.analytic for p in report.pairs}
    assert grads == {"u": pytest.approx([8.0]), "v": pytest.approx([50.0])}


def test_registered_name(assert_grads):
    report = assert_grads("torch.sin", torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert report.served_by == "test-replica" and report.function == "torch.sin"


def test_registered_builtin_callable(assert_grads):
    report = assert_grads(torch.nn.functional.softplus, torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert report.served_by == "test-replica"
    assert report.function == "torch.nn.functional.softplus"


def test_registered_python_function(assert_grads):
    report = assert_grads(scaled_sine, X, input_names=["x"])
    assert report.served_by == "test-replica"
    assert report.function == "plugin_sample_ops:scaled_sine"
    assert report.pairs[0].input == "x"


def test_registered_autograd_function_with_a_bug(assert_grads):
    assert_grads(BadCube.apply, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_lambda_falls_back(assert_grads):
    report = assert_grads(lambda x: x**2, torch.tensor(9.0))
    assert report.served_by == ""
    assert report.notes[-1].startswith("ran locally: server 127.0.0.1:")


@pytest.mark.gradcheck(remote="never")
def test_marker_keeps_it_local(assert_grads):
    assert assert_grads("x**2", torch.tensor(9.0)).served_by == ""
"""


def test_remote_suite(pytester: pytest.Pytester, server_address: str) -> None:
    pytester.makepyfile(test_remote_suite=REMOTE_SUITE)
    result = pytester.runpytest(f"--gradcheck-server={server_address}")
    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines([f"gradcheck: server {server_address} (remote=prefer)"])
    # The server's report, rendered like a local one: wrong elements by index, with values.
    result.stdout.fnmatch_lines(
        ["E *GradientMismatch: gradcheck plugin_sample_ops:BadCube at point 0: GRADIENT MISMATCH*"]
    )
    result.stdout.re_match_lines([r"E +output\[2\] / inputs\[0\]\[2\] +9 +27 "])
    result.stdout.fnmatch_lines(
        [
            "*= gradcheck =*",
            "8 checks run, 1 failed, 0 kinks seen",
            f"where: 6 on {server_address}, 2 local",
            "ran locally, the server cannot run them: 1 check",
            "  test_remote_suite.py::test_lambda_falls_back (*<lambda>: lambda)",
            "slowest: *",
        ]
    )


def test_require_fails_for_what_the_server_cannot_run(
    pytester: pytest.Pytester, server_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADCHECK_SERVER", server_address)  # the environment names the server
    pytester.makepyfile(
        """
        import torch

        def test_lambda(assert_grads):
            assert_grads(lambda x: x**2, torch.tensor(9.0))

        def test_expression(assert_grads):
            assert_grads("x**2", torch.tensor(9.0))
        """
    )
    result = pytester.runpytest("--gradcheck-remote=require")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            ">       assert_grads(lambda x: x**2, torch.tensor(9.0))",
            f"E       Failed: gradcheck: test_lambda.<locals>.<lambda> cannot run on server {server_address} "
            "(lambda) and remote='require' forbids running it locally",
        ]
    )
    result.stdout.fnmatch_lines(["2 checks run, 1 failed (1 could not run), 0 kinks seen"])


def test_never_ignores_the_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import torch\n\ndef test_x(assert_grads):\n    assert_grads('x**2', torch.tensor(9.0))\n"
    )
    result = pytester.runpytest("--gradcheck-server=127.0.0.1:1", "--gradcheck-remote=never")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["where: 1 local"])


def test_unreachable_server_is_one_quick_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        import torch

        @pytest.mark.parametrize("i", range(3))
        def test_x(assert_grads, i):
            assert_grads("x**2", torch.tensor(9.0))

        def test_lambda_needs_no_server(assert_grads):
            assert_grads(lambda x: x**2, torch.tensor(9.0))
        """
    )
    started = time.monotonic()
    result = pytester.runpytest("--gradcheck-server=127.0.0.1:1")
    took = time.monotonic() - started
    result.assert_outcomes(passed=1, failed=3)
    # The short summary repeats each failure's first line (untruncated when $CI is set): count
    # the failure reports themselves.
    out = "\n".join(line for line in result.stdout.lines if not line.startswith("FAILED "))
    # One connect timeout for the whole run, not one per test.
    assert took < 20, took
    assert out.count("cannot reach the gradcheck server at 127.0.0.1:1 within") == 1
    result.stdout.fnmatch_lines(
        [
            "gradcheck server 127.0.0.1:1 is unreachable: cannot reach the gradcheck server at 127.0.0.1:1*",
            "start it, fix --gradcheck-server / gradcheck_server / $GRADCHECK_SERVER, "
            "or run locally with --gradcheck-remote=never",
            "*_ test_x[[]1[]] _*",
            "gradcheck server 127.0.0.1:1 is unreachable (see the first failure)",
        ]
    )
    assert "Traceback" not in out and "_channel" not in out  # no grpc internals
    result.stdout.fnmatch_lines(
        [
            "4 checks run, 3 failed (3 could not run), 0 kinks seen",
            "where: 1 local",
            "server 127.0.0.1:1 unreachable: 3 checks not run",
        ]
    )
