"""Correct code passes with default options, where torch.autograd.gradcheck needs help."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradcheck_svc as gc


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_linear_float32():
    assert gc.check(torch.nn.Linear(8, 5), torch.randn(3, 8)).ok


def test_mlp_float32():
    mlp = torch.nn.Sequential(
        torch.nn.Linear(10, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 4),
    )
    report = gc.check(mlp, torch.randn(6, 10))
    assert report.ok, str(report)
    assert {"0.weight", "0.bias", "4.weight", "inputs[0]"} <= {p.input for p in report.pairs}


def test_conv2d_float32():
    assert gc.check(torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)).ok


def test_layer_norm_float32():
    x = torch.randn(4, 16) * 3 + 1
    w, b = torch.randn(16), torch.randn(16)
    assert gc.check(lambda x, w, b: F.layer_norm(x, (16,), w, b), x, w, b).ok


def test_torch_gradcheck_fails_on_these_float32_cases():
    """The comparison point: torch's own gradcheck rejects the same correct float32 code."""
    x = torch.randn(4, 16, requires_grad=True) * 3 + 1
    with pytest.raises(RuntimeError):
        torch.autograd.gradcheck(lambda x: F.layer_norm(x, (16,)), (x.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("name", "fn", "inputs"),
    [
        ("relu at 0", torch.relu, (torch.tensor([0.0, 1.0, -1.0]),)),
        ("abs at 0", torch.abs, (torch.tensor([0.0, 2.0, -1.0]),)),
        ("maximum with ties", torch.maximum, (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))),
        ("max with ties", lambda x: x.max(), (torch.tensor([1.0, 3.0, 3.0]),)),
    ],
)
def test_kinks_are_reported_not_failed(name, fn, inputs, dtype):
    inputs = tuple(t.to(dtype) for t in inputs)
    report = gc.check(fn, *inputs)
    assert report.ok, str(report)
    assert report.kinks >= 1
    assert any(p.status == gc.Status.KINK for p in report.pairs)
    assert "kink" in str(report)
    assert not gc.check(fn, *inputs, kinks="fail").ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_at_20(dtype):
    assert gc.check(torch.exp, torch.tensor([20.0], dtype=dtype)).ok


def test_unused_input_is_fine():
    report = gc.check(lambda x, y: x.sin(), torch.randn(3), torch.randn(2))
    assert report.ok
    assert all(v == 0 for v in report.pairs[1].analytic)


def test_requires_grad_selects_inputs_and_integers_pass_through():
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3)
    idx = torch.tensor([2, 0, 1])
    report = gc.check(lambda x, y, idx, scale: (x * y)[idx] * scale, x, y, idx, 2.0)
    assert report.ok
    assert [p.input for p in report.pairs] == ["inputs[0]"]


def test_vmap_incompatible_function_falls_back_to_a_loop():
    def branchy(x):
        return x.sin() if x.sum().item() > 0 else x.cos()

    report = gc.check(branchy, torch.rand(5) + 0.1)
    assert report.ok
    assert any("vmap" in note for note in report.notes)


def test_misuse_raises_check_errors():
    with pytest.raises(gc.NothingToCheckError):
        gc.check(lambda n: n * 2, torch.tensor([1, 2]))
    with pytest.raises(gc.OutputTypeError):
        gc.check(lambda x: "nope", torch.tensor(1.0))
    with pytest.raises(gc.FunctionRaisedError, match="boom"):
        gc.check(lambda x: (_ for _ in ()).throw(ValueError("boom")), torch.tensor(1.0))
    with pytest.raises(gc.InvalidOptionError, match="mode"):
        gc.check(torch.sin, torch.tensor(1.0), mode="fastest")
    with pytest.raises(gc.InvalidOptionError, match="tolerance_x"):
        gc.check(torch.sin, torch.tensor(1.0), tolerance_x=1)
    with pytest.raises(TypeError):  # builtin a user would catch
        gc.check(lambda n: n * 2, torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        gc.check(torch.sin, torch.tensor(1.0), rtol=-1)


def test_nan_on_one_side_fails():
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    report = gc.check(NanGrad.apply, torch.tensor([1.0, 2.0]))
    assert not report.ok
    assert report.pairs[0].status == gc.Status.NONFINITE


def test_large_elementwise_streams_without_dense_jacobian():
    """Above the dense limit the analytic side comes by columns (vjp of the vjp)."""
    from gradcheck_svc.engine import full

    x = torch.randn(3000, dtype=torch.float64)
    old = full.DENSE_ENTRIES
    full.DENSE_ENTRIES = 1000
    try:
        report = gc.check(torch.tanh, x, mode="full")
    finally:
        full.DENSE_ENTRIES = old
    assert report.ok and report.pairs[0].elements_checked == 3000 * 3000


def test_a_non_callable_fn_is_a_type_error():
    with pytest.raises(gc.NotCallableError, match="must be callable"):
        gc.check(3, torch.tensor(1.0))
    with pytest.raises(TypeError):
        gc.check("x**2", torch.tensor(1.0))
