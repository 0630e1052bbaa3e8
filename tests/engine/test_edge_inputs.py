"""Edge inputs torch's own operators produce: zero-size tensors, non-differentiable outputs,
conjugate views, complex cotangents at odd offsets, and non-finite input elements."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.report import Status

D = torch.float64
MODES = ["full", "fast"]


# ----------------------------------------------------------------------------- zero-size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "fn", "shapes"),
    [
        ("sin of an empty vector", torch.sin, [(0,)]),
        ("roll", lambda x: torch.roll(x, 0, 0), [(0, 0, 0)]),
        ("svd", lambda x: torch.svd(x), [(0, 0)]),
        ("linalg.svd", lambda x: torch.linalg.svd(x), [(0, 0)]),
        ("cholesky_inverse", torch.cholesky_inverse, [(0, 0)]),
        ("cholesky_solve", torch.cholesky_solve, [(0, 0), (0, 0)]),
        ("adaptive_avg_pool1d", lambda x: torch.nn.functional.adaptive_avg_pool1d(x, 5), [(0, 8, 8)]),
        (
            "adaptive_avg_pool3d",
            lambda x: torch.nn.functional.adaptive_avg_pool3d(x, (5, 7, 4)),
            [(0, 8, 8, 8, 8)],
        ),
        ("pad circular", lambda x: torch.nn.functional.pad(x, (1, 2), mode="circular"), [(0, 3, 3)]),
        ("unfold", lambda x: torch.nn.functional.unfold(x, 2), [(0, 1, 5, 5)]),
        ("pdist of one row (empty output)", torch.nn.functional.pdist, [(1, 1)]),
    ],
)
def test_zero_size_jacobian_checks_trivially(name, fn, shapes, mode):
    inputs = [torch.randn(*shape, dtype=D) for shape in shapes]
    report = gc.check(fn, *inputs, mode=mode)
    assert report.ok, str(report)
    assert report.pairs, "every pair is still listed"
    for pair in report.pairs:
        assert pair.status == Status.PASS
        assert pair.elements_checked == 0
        assert "nothing to compare" in pair.message


def test_zero_size_input_beside_a_real_one_is_checked_for_the_rest():
    def fn(x, y):
        return x * 2, (y**2).sum()

    report = gc.check(fn, torch.randn(0, 3, dtype=D), torch.randn(4, dtype=D))
    assert report.ok, str(report)
    y_pair = next(p for p in report.pairs if p.output == "output[1]" and p.input == "inputs[1]")
    assert y_pair.elements_checked == 4


def test_zero_size_input_beside_a_wrong_gradient_still_fails():
    class WrongSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            ctx.save_for_backward(y)
            return y**2

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            return grad * 3 * y

    report = gc.check(
        lambda x, y: (x * 2, WrongSquare.apply(y)), torch.randn(0, dtype=D), torch.randn(3, dtype=D)
    )
    assert not report.ok


# ----------------------------------------------------------------------------- non-differentiable outputs


def test_outputs_autograd_marks_non_differentiable_are_skipped_and_listed():
    x = torch.randn(2, 3, 4, dtype=D)
    weight, bias = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    report = gc.check(lambda x, w, b: torch.native_layer_norm(x, [4], w, b, 1e-5), x, weight, bias)
    assert report.ok, str(report)
    assert {p.output for p in report.pairs} == {"output[0]"}
    assert any("output[1], output[2]" in note and "non-differentiable" in note for note in report.notes)


def test_native_batch_norm_mean_and_invstd_are_skipped():
    x = torch.randn(3, 2, 4, dtype=D)
    w, b = torch.randn(2, dtype=D), torch.randn(2, dtype=D)
    report = gc.check(lambda x, w, b: torch.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5), x, w, b)
    assert report.ok, str(report)
    assert {p.output for p in report.pairs} == {"output[0]"}


class ValueAndArgmax(torch.autograd.Function):
    """A max with its index, the index cast to float and marked non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        value, index = x.max(dim=-1)
        ctx.save_for_backward(x, index)
        position = index.to(x.dtype)
        ctx.mark_non_differentiable(position)
        return value, position

    @staticmethod
    def backward(ctx, grad_value, grad_position):
        x, index = ctx.saved_tensors
        grad = torch.zeros_like(x)
        return grad.scatter_(-1, index.unsqueeze(-1), grad_value.unsqueeze(-1))


def test_mark_non_differentiable_output_of_a_custom_function_is_skipped():
    report = gc.check(ValueAndArgmax.apply, torch.randn(3, 5, dtype=D))
    assert report.ok, str(report)
    assert [p.output for p in report.pairs] == ["output[0]"]


def test_a_lone_detached_output_is_still_compared_and_caught():
    report = gc.check(lambda x: (x**2).detach(), torch.randn(3, dtype=D))
    assert not report.ok


# ----------------------------------------------------------------------------- complex views


@pytest.mark.parametrize(
    "fn", [torch.fft.ifft, torch.fft.ihfft, lambda x: torch.fft.fft(x).conj()], ids=["ifft", "ihfft", "conj"]
)
def test_conjugate_view_outputs(fn):
    report = gc.check(fn, torch.randn(5, 6, dtype=D))
    assert report.ok, str(report)


def test_conjugate_view_input():
    z = torch.randn(4, dtype=torch.complex128).conj()
    assert z.is_conj()
    report = gc.check(lambda z: z * z, z)
    assert report.ok, str(report)


def test_linalg_eig_with_complex_output_after_an_odd_sized_real_one():
    # (eigenvalues, |eigenvectors|) as torch's OpInfo checks it, and the reverse order:
    # a complex output whose cotangent starts at an odd offset.
    a = torch.randn(5, 5, dtype=D)
    for fn in (
        lambda a: (torch.linalg.eig(a)[0], torch.linalg.eig(a)[1].abs()),
        lambda a: (a[0, :3].sum().reshape(1), torch.linalg.eigvals(a)),
    ):
        report = gc.check(fn, a)
        assert report.ok, str(report)


# ----------------------------------------------------------------------------- non-finite inputs


@pytest.mark.parametrize("mode", MODES)
def test_minus_inf_mask_in_softmax_is_reported_not_differenced(mode):
    partly = torch.randn(2, 3, 4, dtype=D)
    partly[0, 1, 2] = -torch.inf
    wholly = partly.clone()
    wholly[1, :, 0] = -torch.inf  # a whole slice masked: _safe_softmax gives zeros, not NaN, there
    for fn, x in (
        (lambda x: torch.softmax(x, 1), partly),
        (lambda x: torch.ops.aten._safe_softmax.default(x, 1), wholly),
    ):
        report = gc.check(fn, x, mode=mode)
        assert report.ok, str(report)
        assert all(p.max_abs_error == p.max_abs_error for p in report.pairs)  # no NaN from a step
        assert any("inputs[0][0, 1, 2] = -inf" in note for note in report.notes), report.notes


def test_inf_input_with_a_wrong_gradient_elsewhere_still_fails():
    class WrongExp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.exp(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            return grad * y * 1.01

    x = torch.tensor([-torch.inf, 0.5, 1.0], dtype=D)
    report = gc.check(WrongExp.apply, x)
    assert not report.ok
    assert report.pairs[0].status == Status.FAIL


@pytest.mark.parametrize("mode", MODES)
def test_nan_input_is_nonfinite_not_nondeterministic(mode):
    x = torch.tensor([1.0, float("nan"), 2.0], dtype=D)
    report = gc.check(torch.sin, x, mode=mode)
    assert not report.ok
    assert report.pairs[0].status == Status.NONFINITE
    assert "NaN" in report.pairs[0].message
    assert any("inputs[0][1] = nan" in note for note in report.notes)


@pytest.mark.parametrize("mode", MODES)
def test_nan_value_twice_is_not_nondeterminism(mode):
    # sqrt of a negative element: NaN in both backward runs, the same result each time.
    report = gc.check(torch.sqrt, torch.tensor([-1.5, 2.0, 3.0], dtype=D), mode=mode)
    assert all(p.status != Status.NONDETERMINISTIC for p in report.pairs), str(report)
    assert any("NaN" in note for note in report.notes)


@pytest.mark.parametrize("fn", [torch.nansum, lambda x: torch.nanmean(x, dim=0)], ids=["nansum", "nanmean"])
def test_nan_a_reduction_ignores_is_left_out_not_failed(fn):
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]], dtype=D)
    report = gc.check(fn, x)
    assert report.ok, str(report)
    assert any("inputs[0][0, 1] = nan" in note for note in report.notes)


def test_batched_backward_that_disagrees_with_the_eager_one_is_not_judged():
    # torch.vmap's batching rule for cdist's p=1 backward differs from the eager backward,
    # which finite differences confirm: the check judges the backward training runs.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, 2, generator=g, dtype=D) * 5
    b = torch.randn(5, 6, 2, generator=g, dtype=D) * 5
    report = gc.check(lambda a, b: torch.cdist(a, b, p=1.0), a, b)
    assert report.ok, str(report)


def test_a_wrong_backward_is_still_caught_when_batching_is_verified():
    class WrongCube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x

    report = gc.check(lambda x: WrongCube.apply(x) @ torch.ones(4, 3, dtype=D), torch.randn(6, 4, dtype=D))
    assert not report.ok


def test_batched_forward_that_disagrees_with_a_plain_call_is_not_used():
    # torch.vmap's roll of a 0-d tensor mixes the batch: not nondeterminism of fn.
    report = gc.check(lambda x: torch.roll(x, 10), torch.tensor(-4.8, dtype=D))
    assert report.ok, str(report)
    assert report.pairs[0].status == Status.PASS


def test_a_random_fn_is_still_nondeterministic():
    report = gc.check(lambda x: x + torch.rand(()).to(x.dtype), torch.randn(3, dtype=D))
    assert not report.ok
    assert any(p.status == Status.NONDETERMINISTIC for p in report.pairs)


def test_storage_level_ops_see_their_own_input_in_the_loop():
    # as_strided reads storage: evaluated on a row view of the perturbation batch it would read
    # the neighbouring row. .item() forces the loop path.
    def fn(x):
        return torch.as_strided(x, (1,), (1,), 0) * float(x.detach().sum().item() != 0)

    for shape in [(1,), (3,)]:
        report = gc.check(fn, torch.randn(*shape, dtype=D) + 3)
        assert report.ok, str(report)


def test_sparse_tensors_get_a_clear_error_not_a_torch_crash() -> None:
    # A sparse input has no elements to perturb one by one; a sparse output no dense Jacobian rows.
    csr = torch.eye(3, dtype=torch.float64).to_sparse_csr().requires_grad_()
    with pytest.raises(gc.UnsupportedTensorError, match=r"inputs\[0\] is a sparse_csr tensor"):
        gc.check(lambda a: a.to_dense().sum(), csr)
    with pytest.raises(gc.UnsupportedTensorError, match="output is a sparse_coo tensor"):
        gc.check(lambda a: torch.diag(a).to_sparse(), torch.randn(3, dtype=torch.float64))
    assert issubclass(gc.UnsupportedTensorError, TypeError)
