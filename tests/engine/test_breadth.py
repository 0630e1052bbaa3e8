"""Complex, second order, forward mode, nondeterminism, modules, structured inputs, plot, Taylor."""

from __future__ import annotations

import struct

import pytest
import torch

import gradcheck_svc as gc

# ----------------------------------------------------------------------------- complex


class ConjMul(torch.autograd.Function):
    """z * w for complex tensors; the bug conjugates the gradient of z the wrong way."""

    @staticmethod
    def forward(ctx, z, w, bug=False):
        ctx.save_for_backward(z, w)
        ctx.bug = bug
        return z * w

    @staticmethod
    def backward(ctx, grad):
        z, w = ctx.saved_tensors
        grad_z = grad * w if ctx.bug else grad * w.conj()  # torch's convention: conj of the derivative
        return grad_z, grad * z.conj(), None


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_conjugation_bug_is_caught(dtype):
    z, w = torch.randn(3, dtype=dtype), torch.randn(3, dtype=dtype)
    report = gc.check(lambda z, w: ConjMul.apply(z, w, True), z, w, input_names=["z", "w"])
    by_input = {p.input: p for p in report.pairs}
    assert by_input["z"].status == gc.Status.FAIL and by_input["w"].ok
    assert by_input["z"].worst[0].input_part in ("re", "im")
    assert gc.check(lambda z, w: ConjMul.apply(z, w, False), z, w).ok


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_correct_complex_functions_pass(dtype):
    z = torch.randn(5, dtype=dtype)
    assert gc.check(lambda z: z * z.conj(), z).ok
    assert gc.check(lambda z: torch.fft.fft(z).abs(), z).ok


# ----------------------------------------------------------------------------- second order


class CubeDetachedBackward(torch.autograd.Function):
    """x**3 whose backward uses a detached x: right at order 1, wrong at order 2."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x.detach() ** 2


def test_detached_backward_caught_at_order_2_only():
    x = torch.randn(4, dtype=torch.float64)
    assert gc.check(CubeDetachedBackward.apply, x).ok
    report = gc.check(CubeDetachedBackward.apply, x, order=2)
    assert not report.ok
    assert report.order == 2 and report.pairs[0].output.startswith("grad[")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_correct_functions_pass_at_order_2(dtype):
    x = torch.randn(6, dtype=dtype)
    assert gc.check(lambda x: torch.tanh(x).sum() * x, x, order=2).ok
    assert gc.check(lambda x: torch.sin(x) ** 2, x, order=2).ok


# ----------------------------------------------------------------------------- forward mode


class WrongJvp(torch.autograd.Function):
    """sin with a correct backward and a wrong jvp (forgets the cosine)."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_forward(x)
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()

    @staticmethod
    def jvp(ctx, tangent):
        return tangent  # should be tangent * cos(x)


def test_forward_ad_catches_a_wrong_jvp():
    x = torch.randn(5, dtype=torch.float64)
    assert gc.check(WrongJvp.apply, x).ok  # reverse mode alone is right
    report = gc.check(WrongJvp.apply, x, forward_ad=True)
    assert not report.ok
    checks = {p.check: p.status for p in report.pairs}
    assert checks[gc.Check.REVERSE] == gc.Status.PASS
    assert checks[gc.Check.FORWARD] == gc.Status.FAIL
    assert checks[gc.Check.FORWARD_VS_REVERSE] == gc.Status.FAIL


def test_forward_ad_passes_for_builtin_ops():
    report = gc.check(lambda x: torch.tanh(x) @ x.T, torch.randn(3, 4, dtype=torch.float64), forward_ad=True)
    assert report.ok
    assert {p.check for p in report.pairs} == {
        gc.Check.REVERSE,
        gc.Check.FORWARD,
        gc.Check.FORWARD_VS_REVERSE,
    }


# ----------------------------------------------------------------------------- nondeterminism


class NoisyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 + 1e-9 * torch.rand_like(grad)


def test_nondeterministic_backward_is_reported_and_tolerated_with_nondet_tol():
    x = torch.randn(4, dtype=torch.float64)
    report = gc.check(NoisyBackward.apply, x)
    assert report.pairs[0].status == gc.Status.NONDETERMINISTIC
    assert not report.ok
    assert "two backward runs differ" in str(report)
    assert gc.check(NoisyBackward.apply, x, nondet_tol=1e-6).ok


def test_nondeterministic_forward_is_reported():
    report = gc.check(lambda x: x * (1 + 1e-3 * torch.rand(())), torch.randn(3, dtype=torch.float64))
    assert not report.ok
    assert any("not deterministic" in n for n in report.notes)


# ----------------------------------------------------------------------------- modules


class LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bug):
        ctx.save_for_backward(x, weight)
        ctx.bug = bug
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_weight = grad.T @ x
        if ctx.bug:
            grad_weight = grad_weight * 0.9
        return grad @ weight, grad_weight, grad.sum(0), None


class MyLinear(torch.nn.Module):
    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.bug = bug

    def forward(self, x):
        return LinearFn.apply(x, self.weight, self.bias, self.bug)


def test_module_parameters_are_checked_and_named():
    x = torch.randn(2, 4, dtype=torch.float64)
    report = gc.check(MyLinear(bug=True), x)
    by_input = {p.input: p for p in report.pairs}
    assert set(by_input) == {"inputs[0]", "weight", "bias"}
    assert by_input["weight"].status == gc.Status.FAIL
    assert by_input["bias"].ok and by_input["inputs[0]"].ok
    assert "d output / d weight" in str(report)
    assert gc.check(MyLinear(bug=False), x).ok


def test_nested_module_names_and_frozen_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    net[0].bias.requires_grad_(False)
    report = gc.check(net, torch.randn(2, 3, dtype=torch.float64))
    assert report.ok
    assert {p.input for p in report.pairs} == {"inputs[0]", "0.weight", "2.weight", "2.bias"}


# ----------------------------------------------------------------------------- structured inputs


def test_structured_inputs_are_named_by_path_and_kwargs_reach_fn():
    def fn(x, params, *, power):
        return (params["scale"] * x**power + params["shift"][0]).sum(0)

    x = torch.randn(3, 2, dtype=torch.float64)
    params = {"scale": torch.randn(2, dtype=torch.float64), "shift": (torch.randn(2, dtype=torch.float64), 1)}
    report = gc.check(fn, x, params, fn_kwargs={"power": 3})
    assert report.ok
    names = {p.input for p in report.pairs}
    assert names == {"inputs[0]", "inputs[1]['scale']", "inputs[1]['shift'][0]"}
    assert "inputs[1]['scale']" in str(report)


def test_tuple_outputs_are_named():
    report = gc.check(lambda x: (x.sin(), {"c": x.cos()}), torch.randn(2, dtype=torch.float64))
    assert {p.output for p in report.pairs} == {"output[0]", "output[1]['c']"}


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(gc.DeviceUnavailableError, match="CUDA is not available"):
        gc.check(torch.sin, torch.randn(2), device="cuda")
    with pytest.raises(RuntimeError):
        gc.check(torch.sin, torch.randn(2), compare_devices=True)
    assert gc.check(torch.sin, torch.randn(2), device="auto").device == "cpu"


# ----------------------------------------------------------------------------- picture


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_heatmap_per_failing_pair(tmp_path):
    w = torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(6, dtype=torch.float64)
    from planted import MatVec

    report = gc.check(lambda w, x: MatVec.apply(w, x, True), w, x, input_names=["w", "x"])
    failing = report.failures
    assert len(failing) == 1 and failing[0].error_map is not None
    path = report.plot(tmp_path / "errors.png")
    assert _png_size(path) == (450, 450)
    with pytest.raises(gc.CheckError, match="nothing to plot"):
        gc.check(torch.sin, x).plot(tmp_path / "none.png")


# ----------------------------------------------------------------------------- Taylor


def test_taylor_rates_show_order_two_for_correct_and_one_for_buggy_gradients():
    from planted import Square

    x = torch.rand(5, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    good = gc.check(lambda x: torch.exp(torch.sin(x)), x, scheme="taylor")
    assert good.ok and good.pairs[0].check == gc.Check.TAYLOR
    assert all(abs(r - 2) < 0.2 for r in good.pairs[0].taylor_rates[-3:])
    bad = gc.check(lambda x: Square.apply(x, "scale1pct"), x, scheme="taylor")
    assert not bad.ok
    assert abs(bad.pairs[0].taylor_rates[-1] - 1) < 0.2
    assert "convergence rate" in str(bad)


@pytest.mark.parametrize("order", [1, 2])
def test_rerun_of_a_large_backward_is_bitwise_comparable(order):
    """The second backward run repeats the first batch exactly: a batch of another size may round
    differently, which must not read as nondeterminism."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 600, generator=g, dtype=torch.float64) / 600**0.5
    x = torch.randn(600, generator=g, dtype=torch.float64)
    report = gc.check(lambda x: torch.sin(torch.tanh(w @ x)), x, order=order, mode="full")
    assert report.ok, str(report)
    assert report.pairs[0].nondeterminism == 0.0
