"""The analytic Jacobian by hypothesised block structure: used where it holds, and a wrong
hypothesis, a wrong backward or a Jacobian outside the blocks all end with the exact verdict."""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine import structure
from gradcheck_svc.engine.structure import PairStructure, candidates

_FALLBACK = "the block structure the shapes suggest did not hold"


def _structured(report: gc.Report) -> bool:
    return "structured_analytic_s" in report.timings


def _fell_back(report: gc.Report) -> bool:
    return any(note.startswith(_FALLBACK) for note in report.notes)


def _exact(fn, *inputs, monkeypatch, **options) -> gc.Report:
    with monkeypatch.context() as patch:
        patch.setattr(structure, "ENABLED", False)
        return gc.check(fn, *inputs, **options)


def _located(report: gc.Report) -> list[tuple]:
    return [
        (
            p.output,
            p.input,
            p.status,
            p.elements_failed,
            p.elements_checked,
            p.kinks,
            p.nondeterminism,
            sorted(
                (
                    tuple(e.output_index),
                    tuple(e.input_index),
                    e.kink,
                    e.analytic,
                    e.numeric,
                    e.error_bar,
                    e.tolerance,
                )
                for e in p.worst
            ),
        )
        for p in report.pairs
    ]


class Tanh(torch.autograd.Function):
    """Old-style elementwise Function with a correct backward."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Softmax(torch.autograd.Function):
    """Row-wise softmax with a correct hand-written backward."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


class BiasTanh(torch.autograd.Function):
    """tanh(x + b) with b broadcast over rows: a batch-leading leaf and a broadcast one."""

    @staticmethod
    def forward(ctx, x, b):
        y = torch.tanh(x + b)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        gx = g * (1 - y * y)
        return gx, gx.sum(0)


class CrossBatchSpurious(torch.autograd.Function):
    """y = x^2 row by row; the backward adds a term from the next batch row that is not there."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g + 0.25 * torch.roll(g, 1, dims=0)


class DroppedOffDiagonal(torch.autograd.Function):
    """Softmax whose backward keeps only the diagonal of each row's block."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


class CrossBatchMissing(torch.autograd.Function):
    """y = x^2 + 0.5 x of the previous batch row; the backward claims rows are independent."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x + 0.5 * torch.roll(x, 1, dims=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OneWrongValue(torch.autograd.Function):
    """sin, with one element of the gradient 1% off."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = (g * torch.cos(x)).reshape(-1).clone()
        grad[37] *= 1.01
        return grad.reshape(x.shape)


class WrongBiasGradient(torch.autograd.Function):
    """tanh(x + b); the bias gradient takes the first row only instead of the sum over rows."""

    @staticmethod
    def forward(ctx, x, b):
        y = torch.tanh(x + b)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        gx = g * (1 - y * y)
        return gx, gx[0]


def test_candidates_from_shapes():
    assert candidates((20, 50), (20, 50)) == [PairStructure("batch", 2), PairStructure("batch", 1)]
    assert candidates((40,), (40, 25)) == [PairStructure("batch", 1)]  # logsumexp over the last dim
    assert candidates((8, 64), (64,)) == [PairStructure("broadcast")]  # a bias or a norm's weight
    assert candidates((8, 8), (8,)) == [PairStructure("batch", 1), PairStructure("broadcast")]
    assert candidates((8, 8), (32, 8)) == []  # nothing the shapes tell: dense
    assert candidates((), ()) == []  # a scalar


@pytest.mark.parametrize(
    "fn, inputs",
    [
        (Tanh.apply, (torch.randn(300, dtype=torch.float64),)),
        (Tanh.apply, (torch.randn(12, 25, dtype=torch.float64),)),
        (Softmax.apply, (torch.randn(15, 20, dtype=torch.float64),)),
        (BiasTanh.apply, (torch.randn(30, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64))),
        (lambda x: torch.logsumexp(x, -1), (torch.randn(30, 12, dtype=torch.float64),)),
        (lambda x: (torch.tanh(x), torch.softmax(x, -1)), (torch.randn(12, 9, dtype=torch.float64),)),
    ],
    ids=["elementwise", "elementwise-2d", "row-wise", "bias", "reduced-rows", "tuple-output"],
)
def test_correct_block_structured_functions_pass_by_structure(fn, inputs, monkeypatch):
    report = gc.check(fn, *inputs)
    assert report.ok, report.notes
    assert _structured(report) and not _fell_back(report)
    exact = _exact(fn, *inputs, monkeypatch=monkeypatch)
    assert exact.ok and not _structured(exact)
    assert _located(report) == _located(exact)  # the worst elements shown, values and bars too


def test_module_with_parameters_passes_by_structure(monkeypatch):
    layer = torch.nn.LayerNorm(16).double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(10, 16, dtype=torch.float64)
    report = gc.check(layer, x)
    exact = _exact(layer, x, monkeypatch=monkeypatch)
    assert report.ok and _structured(report)
    assert [(p.input, p.status, p.elements_checked) for p in report.pairs] == [
        (p.input, p.status, p.elements_checked) for p in exact.pairs
    ]
    assert {p.input for p in report.pairs} == {"inputs[0]", "weight", "bias"}


class WrongFactor(torch.autograd.Function):
    """Old-style elementwise 3 tanh(x / 3); the backward keeps a stray factor 3."""

    @staticmethod
    def forward(ctx, x):
        t = torch.tanh(x / 3)
        ctx.save_for_backward(t)
        return 3 * t

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return 3 * g * (1 - t * t)


class UnflippedConv(torch.autograd.Function):
    """A banded 'same' correlation whose backward forgets to flip the kernel."""

    weight = torch.tensor([[[0.1, -0.4, 1.0, 0.3, -0.2]]], dtype=torch.float64)

    @staticmethod
    def forward(ctx, x):
        return torch.nn.functional.conv1d(x, UnflippedConv.weight, padding=2)

    @staticmethod
    def backward(ctx, g):
        return torch.nn.functional.conv1d(g, UnflippedConv.weight.transpose(0, 1), padding=2)


_BUGS = [
    (CrossBatchSpurious.apply, (torch.randn(12, 10, dtype=torch.float64),)),
    (DroppedOffDiagonal.apply, (torch.randn(10, 12, dtype=torch.float64),)),
    (CrossBatchMissing.apply, (torch.randn(12, 10, dtype=torch.float64),)),
    (OneWrongValue.apply, (torch.randn(8, 10, dtype=torch.float64),)),
    (
        WrongBiasGradient.apply,
        (torch.randn(30, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)),
    ),
    (WrongFactor.apply, (3 * torch.randn(400, dtype=torch.float64),)),
    (UnflippedConv.apply, (torch.randn(6, 1, 60, dtype=torch.float64),)),
]
_BUG_IDS = [
    "spurious-cross-batch",
    "dropped-in-block",
    "true-jacobian-crosses-batch",
    "wrong-value",
    "wrong-bias",
    "elementwise-factor",
    "banded-unflipped",
]


@pytest.mark.parametrize("fn, inputs", _BUGS, ids=_BUG_IDS)
def test_bugs_fail_at_the_same_elements_as_the_exact_path(fn, inputs, monkeypatch):
    # Every located element, its values and error bars included, as with the structure path off.
    report = gc.check(fn, *inputs, max_worst=100)
    exact = _exact(fn, *inputs, max_worst=100, monkeypatch=monkeypatch)
    assert not report.ok and not exact.ok
    assert _located(report) == _located(exact)
    assert sum(p.elements_failed for p in report.pairs) > 0


@pytest.mark.parametrize("fn, inputs", _BUGS[1:], ids=_BUG_IDS[1:])
def test_a_backward_inside_the_structure_keeps_the_compressed_rows(fn, inputs):
    # The backward stays inside the hypothesis (it is wrong in values, or misses a term of f):
    # the second compressed pass confirms the rebuilt Jacobian, and no row-by-row pass is needed.
    report = gc.check(fn, *inputs)
    assert not report.ok
    assert _structured(report) and not _fell_back(report)


def test_a_spurious_term_the_first_pass_hid_sends_the_check_to_the_exact_path():
    # The spurious term comes from a row of the same cotangent (same parity): only the second
    # pass, weighted otherwise, shows that the rebuilt Jacobian is not the backward's.
    report = gc.check(CrossBatchSpurious.apply, torch.randn(12, 10, dtype=torch.float64))
    assert not report.ok
    assert not _structured(report) and _fell_back(report)


@pytest.mark.parametrize("dim, structured", [(-1, True), (0, False)])
def test_correct_function_outside_the_finest_hypothesis(dim, structured, monkeypatch):
    # Banded: the equal shapes suggest elementwise first, but the backward reaches a neighbour,
    # within the row (row-wise blocks hold) or across rows (no hypothesis holds: the exact path).
    def smooth(x):
        return x * x + 0.5 * torch.roll(x, 1, dims=dim)

    x = torch.randn(4, 50, dtype=torch.float64)
    report = gc.check(smooth, x)
    exact = _exact(smooth, x, monkeypatch=monkeypatch)
    assert report.ok and exact.ok
    assert _structured(report) is structured and _fell_back(report) is not structured
    assert [(p.status, p.elements_checked, p.elements_failed) for p in report.pairs] == [
        (p.status, p.elements_checked, p.elements_failed) for p in exact.pairs
    ]


def test_nondeterministic_backward_is_reported_as_by_the_exact_path(monkeypatch):
    class Noisy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.cos(x) * (1 + 1e-3 * torch.rand(()).item())

    x = torch.randn(200, dtype=torch.float64)
    report = gc.check(Noisy.apply, x)
    exact = _exact(Noisy.apply, x, monkeypatch=monkeypatch)
    assert report.pairs[0].status == exact.pairs[0].status == gc.Status.NONDETERMINISTIC


def test_kinks_report_the_exact_elements(monkeypatch):
    x = torch.cat([torch.zeros(4), torch.linspace(-2, 2, 96)]).double()
    report = gc.check(torch.relu, x, max_worst=100)
    exact = _exact(torch.relu, x, max_worst=100, monkeypatch=monkeypatch)
    assert report.pairs[0].kinks == exact.pairs[0].kinks > 0
    assert _located(report) == _located(exact)


class ReluWrongSlope(torch.autograd.Function):
    """relu whose backward is 10% off on the last quarter of the elements."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = g * (x > 0)
        scale = torch.ones_like(grad)
        scale[-x.numel() // 4 :] = 1.1
        return grad * scale


def test_a_failing_check_with_kinks_reports_the_exact_elements(monkeypatch):
    x = torch.cat([torch.zeros(4), torch.linspace(-2, 2, 96)]).double()
    report = gc.check(ReluWrongSlope.apply, x, max_worst=100)
    exact = _exact(ReluWrongSlope.apply, x, max_worst=100, monkeypatch=monkeypatch)
    assert report.pairs[0].status == exact.pairs[0].status == gc.Status.FAIL
    assert report.pairs[0].kinks == exact.pairs[0].kinks > 0
    assert _located(report) == _located(exact)


@pytest.mark.parametrize("noise", [1e-3, 1e-15])
def test_a_failing_nondeterministic_backward_is_reported_as_by_the_exact_path(noise, monkeypatch):
    # Noise above the rebuilds' rounding allowance, and noise within it (the re-run catches it).
    class NoisyWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.sin(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 1.5 * g * torch.cos(x) * (1 + noise * torch.rand(x.shape, dtype=x.dtype))

    x = torch.randn(200, dtype=torch.float64)
    report = gc.check(NoisyWrong.apply, x)
    exact = _exact(NoisyWrong.apply, x, monkeypatch=monkeypatch)
    assert report.pairs[0].status == exact.pairs[0].status == gc.Status.NONDETERMINISTIC


class RowWiseOneWrong(torch.autograd.Function):
    """Row-wise softmax whose backward is wrong in one row alone: its group fails, and the
    columns it re-checks mostly pass on the central difference (no third node there)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        grad = y * (g - (g * y).sum(-1, keepdim=True))
        grad[3] = grad[3] * 1.01
        return grad


def test_a_wrong_row_among_many_reports_as_the_exact_path(monkeypatch):
    # Located elements, values, error bars and tolerances as with the structure path off.
    from gradcheck_svc.engine import colouring

    x = torch.randn(60, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    calls: list[int] = []
    real = colouring.adaptive_singles
    monkeypatch.setattr(colouring, "adaptive_singles", lambda *a, **k: calls.append(1) or real(*a, **k))
    report = gc.check(RowWiseOneWrong.apply, x, mode="full", max_worst=100)
    assert calls  # the columns of the failing groups were re-checked with x + 2h where in doubt
    exact = _exact(RowWiseOneWrong.apply, x, mode="full", max_worst=100, monkeypatch=monkeypatch)
    assert not report.ok and _structured(report)
    assert _located(report) == _located(exact)
    (pair,) = report.pairs
    assert {e.output_index[0] for e in pair.worst} == {3}
