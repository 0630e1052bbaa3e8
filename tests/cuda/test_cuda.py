"""The engine on a CUDA device. Skipped (with the reason) where CUDA is absent; run them on a GPU
machine with ``tests/run_cuda_tests.sh``."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_examples_on_cuda(dtype):
    r = gc.check(lambda x: x**2, torch.tensor(9.0, dtype=dtype), device="cuda")
    assert r.ok and r.device.startswith("cuda") and r.pairs[0].analytic == pytest.approx([18.0])
    r = gc.check(lambda x: torch.sin(x / 2**1.5), torch.tensor(100.0, dtype=dtype), device="cuda")
    assert r.ok and round(r.pairs[0].analytic[0], 4) == -0.2469
    r = gc.check(
        lambda u, v: u * v + u**2 + v**3,
        torch.tensor(2.0, dtype=dtype),
        torch.tensor(4.0, dtype=dtype),
        device="cuda",
        input_names=["u", "v"],
    )
    assert r.ok and [p.analytic[0] for p in r.pairs] == pytest.approx([8.0, 50.0])


def test_auto_picks_cuda_and_inputs_already_on_cuda_stay_there():
    assert gc.check(torch.sin, torch.randn(3), device="auto").device.startswith("cuda")
    assert gc.check(torch.sin, torch.randn(3, device="cuda")).device.startswith("cuda")


def test_planted_bug_caught_on_cuda():
    class WrongSign(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return -2 * x * g

    report = gc.check(WrongSign.apply, torch.randn(64), device="cuda")
    assert not report.ok and report.pairs[0].status == gc.Status.FAIL


def test_float32_mlp_and_conv_on_cuda():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    assert gc.check(mlp, torch.randn(4, 16), device="cuda").ok
    assert gc.check(torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8), device="cuda").ok


def test_compare_devices_reports_cpu_vs_cuda():
    torch.manual_seed(0)
    w = torch.randn(32, 32, dtype=torch.float64)
    report = gc.check(
        lambda w, x: torch.tanh(w @ x), w, torch.randn(32, dtype=torch.float64), compare_devices=True
    )
    devices = [p for p in report.pairs if p.check == gc.Check.DEVICES]
    assert len(devices) == 1 and devices[0].ok
    assert devices[0].max_abs_error < 1e-10


def test_large_check_on_cuda_fast_and_full():
    x = torch.randn(4000, dtype=torch.float64)
    assert gc.check(torch.tanh, x, device="cuda", mode="full").ok
    w = torch.randn(1000, 1000, dtype=torch.float64, device="cuda") / 1000**0.5
    assert gc.check(
        lambda x: torch.sin(torch.tanh(w @ x)), torch.randn(1000, dtype=torch.float64, device="cuda")
    ).ok


class _Conv2d(torch.autograd.Function):
    """conv2d with a hand-written backward; ``scale`` multiplies the weight's gradient."""

    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return torch.nn.functional.conv2d(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(x.shape, w, g)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, g) * ctx.scale
        return gx, gw, None


@pytest.fixture
def tf32_allowed():
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_float32_conv_and_matmul_with_tf32_allowed_pass_and_bugs_are_caught(tf32_allowed):
    """With TF32 (10-bit mantissa products) a correct float32 conv backward is ~1e-3 off the float64
    differences; the check runs it with TF32 off, says so, and still catches a 0.1% error."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12, device="cuda")
    w = torch.randn(16, 8, 3, 3, device="cuda")
    report = gc.check(lambda x, w: _Conv2d.apply(x, w, 1.0), x, w)
    assert report.ok, report
    assert any("TF32" in note for note in report.notes)
    assert not gc.check(lambda x, w: _Conv2d.apply(x, w, 1.001), x, w).ok
    conv3d = torch.nn.Conv3d(4, 6, 3).cuda()
    assert gc.check(conv3d, torch.randn(1, 4, 6, 6, 6, device="cuda")).ok
    a, b = torch.randn(16, 256, device="cuda"), torch.randn(256, 64, device="cuda")
    assert gc.check(lambda a, b: torch.tanh(a @ b / 16), a, b).ok
