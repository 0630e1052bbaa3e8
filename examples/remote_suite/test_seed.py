"""The seed examples, checked on a gradcheck-svc server through the ``assert_grads`` fixture.

Run against a server:  GRADCHECK_SERVER=localhost:50051 pytest examples/remote_suite
(or ``--gradcheck-server localhost:50051``). An expression string is sent to the server as text; the
inputs travel as tensors; the server runs autograd and finite differences and sends the Report back.
"""

import math

import pytest
import torch


def _served(report):
    # The server names the replica (its hostname) that ran the check.
    assert report.served_by, "the report does not name a server: the check did not run remotely"
    return report


def test_square_at_9(assert_grads):
    report = _served(assert_grads("x**2", torch.tensor(9.0)))
    (pair,) = report.pairs
    assert pair.input == "x"
    assert pair.analytic == pytest.approx([18.0])
    assert pair.numeric == pytest.approx([18.0], rel=1e-3)


def test_sin_of_scaled_x_at_100(assert_grads):
    report = _served(assert_grads("sin(x / 2**1.5)", torch.tensor(100.0, dtype=torch.float64)))
    (pair,) = report.pairs
    expected = math.cos(100 / 2**1.5) / 2**1.5
    assert expected == pytest.approx(-0.2469, abs=1e-4)
    assert pair.analytic == pytest.approx([expected], rel=1e-9)


def test_two_inputs_at_2_4(assert_grads):
    u, v = torch.tensor(2.0, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    report = _served(assert_grads("u**2 + v**3 + u*v", u, v))
    grads = {pair.input: pair.analytic for pair in report.pairs}
    assert grads == {"u": pytest.approx([8.0]), "v": pytest.approx([50.0])}


def test_inputs_by_name_and_engine_options(assert_grads):
    point = {"u": torch.tensor(2.0, dtype=torch.float64), "v": torch.tensor(4.0, dtype=torch.float64)}
    report = _served(assert_grads("u**2 + v**3 + u*v", point, mode="full", atol=1e-6))
    assert report.ok
    assert report.mode == "full"


@pytest.mark.gradcheck(mode="full")
def test_vector_input_float32(assert_grads):
    # float32 is checked as float32: the finite-difference error bars keep it from failing falsely.
    x = torch.linspace(-2.0, 2.0, 9)
    report = _served(assert_grads("sin(x) * x**2", x))
    (pair,) = report.pairs
    assert pair.dtype == "float32"
    assert pair.elements_checked == 81


def test_registered_torch_function(assert_grads):
    report = _served(assert_grads(torch.tanh, torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)))
    assert report.ok
