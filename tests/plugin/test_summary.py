"""The terminal summary: its lines, and aggregation across xdist workers."""

from __future__ import annotations

import pytest

from pytest_gradcheck.summary import LOCAL, CheckRecord, Tally, summary_lines


def _rec(nodeid: str, **kw: object) -> CheckRecord:
    base: dict[str, object] = {"function": "f", "where": LOCAL, "ok": True, "seconds": 0.1}
    return CheckRecord(nodeid, **{**base, **kw})  # type: ignore[arg-type]


def test_no_records_no_lines() -> None:
    assert summary_lines([]) == []


def test_lines() -> None:
    records = [
        _rec("t.py::a", kinks=2),
        _rec("t.py::b", ok=False, seconds=1.5, function="g"),
        _rec("t.py::c", where="h:1", seconds=0.2),
        _rec("t.py::d", fallback="lambda", function="<lambda>"),
        _rec("t.py::e", where="h:1", ok=False, error="ServiceError: bad spec"),
    ]
    assert summary_lines(records) == [
        "5 checks run, 2 failed (1 could not run), 2 kinks seen (in 1 check)",
        "where: 2 on h:1, 3 local",
        "ran locally, the server cannot run them: 1 check",
        "  t.py::d (<lambda>: lambda)",
        "slowest: 1.50 s t.py::b (g, local)",
    ]


def test_unreachable_and_many_fallbacks() -> None:
    records = [_rec(f"t.py::f{i}", fallback="closure (defined inside a function)") for i in range(7)]
    records += [_rec("t.py::u", where="h:9", ok=False, unreachable=True, error="down")]
    lines = summary_lines(records)
    assert lines[0] == "8 checks run, 1 failed (1 could not run), 0 kinks seen"
    assert lines[1:4] == [
        "where: 7 local",
        "server h:9 unreachable: 1 check not run",
        "ran locally, the server cannot run them: 7 checks",
    ]
    assert lines[-2] == "  ... and 2 more (-v lists them all)"


def test_tally_round_trip() -> None:
    tally, other = Tally(), Tally()
    tally.add(_rec("t.py::a", kinks=1, fallback="lambda"))
    other.load(tally.dump())
    assert other.records == tally.records


XDIST_SUITE = """
import pytest
import torch

X = torch.tensor([0.3, 0.7], dtype=torch.float64)


@pytest.mark.parametrize("i", range(6))
def test_sine(assert_grads, i):
    assert_grads("sin(x)", X + i)   # an expression: runs on the server


def test_wrong(assert_grads):
    assert_grads(lambda x: x.detach() * x, X)   # a lambda runs locally; gradient x where 2x is right


def test_relu(assert_grads):
    assert_grads(torch.relu, torch.tensor([0.0], dtype=torch.float64))   # registered as torch.relu
"""


def test_xdist_aggregates_every_worker_once(pytester: pytest.Pytester, server_address: str) -> None:
    pytester.makepyfile(test_suite=XDIST_SUITE)
    result = pytester.runpytest("-n", "2", "-p", "xdist", f"--gradcheck-server={server_address}")
    result.assert_outcomes(passed=7, failed=1)
    out = result.stdout.str()
    assert out.count("= gradcheck =") == 1
    assert out.count("checks run") == 1
    result.stdout.fnmatch_lines(
        [
            "*= gradcheck =*",
            "8 checks run, 1 failed, 1 kink seen (in 1 check)",
            f"where: 7 on {server_address}, 1 local",
            "ran locally, the server cannot run them: 1 check",
            "  test_suite.py::test_wrong (test_wrong.<locals>.<lambda>: lambda)",
            "slowest: * s test_suite.py::* (*)",
            "*= short test summary info =*",
        ]
    )
