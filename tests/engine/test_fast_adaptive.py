"""Fast mode's adaptive third node: x + 2h only where the central difference leaves a verdict in doubt.

Where fast mode moves every leaf at once, each leaf is first moved to x - h and x + h; a leaf
takes x + 2h (the Richardson value, its error bar and the kink test) only where some
projection does not pass clearly or some output is not smooth at the scale of the step. These
tests hold the adaptive path to the verdicts of the path that always takes the third node.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from corpus import CASES, make_inputs
from planted import NoisyDenseBackward

import gradcheck_svc as gc
from gradcheck_svc.engine import fast, fast_batched
from gradcheck_svc.report import Status

D = torch.float64
N = 400


def _counted(fn: Callable[..., torch.Tensor]) -> tuple[Callable[..., torch.Tensor], list[int]]:
    calls = [0]

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return fn(*inputs)

    return call, calls


def _both(
    monkeypatch: pytest.MonkeyPatch, fn: Callable[..., torch.Tensor], *inputs: Any, **options: Any
) -> tuple[gc.Report, gc.Report, int, int]:
    """The fast-mode report with the adaptive node and with the third node always taken, and
    how many times each called fn."""
    counted, calls = _counted(fn)
    adaptive = gc.check(counted, *inputs, mode="fast", **options)
    adaptive_calls = calls[0]
    monkeypatch.setattr(fast_batched, "ADAPTIVE", False)
    calls[0] = 0
    eager = gc.check(counted, *inputs, mode="fast", **options)
    monkeypatch.setattr(fast_batched, "ADAPTIVE", True)
    return adaptive, eager, adaptive_calls, calls[0]


def _dense(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=D) / n**0.5, torch.randn(n, generator=g, dtype=D)


def _statuses(report: gc.Report) -> list[tuple[str, str, Status]]:
    return [(p.output, p.input, p.status) for p in report.pairs]


@pytest.mark.parametrize("seed", range(6))
def test_a_smooth_dense_function_skips_the_third_node_with_the_same_verdict(monkeypatch, seed):
    w, x = _dense(seed=seed)
    adaptive, eager, adaptive_calls, eager_calls = _both(
        monkeypatch, lambda x: torch.sin(torch.tanh(w @ x)), x
    )
    assert adaptive.ok and eager.ok
    assert _statuses(adaptive) == _statuses(eager)
    assert adaptive_calls == eager_calls - 1  # one leaf, settled by x - h and x + h


def test_several_inputs_each_settled_on_its_own(monkeypatch):
    w, x = _dense()
    b = torch.linspace(-1, 1, N, dtype=D)
    adaptive, eager, adaptive_calls, eager_calls = _both(
        monkeypatch, lambda x, w, b: torch.tanh(w @ x + b), x, w, b
    )
    assert adaptive.ok and eager.ok
    assert _statuses(adaptive) == _statuses(eager)
    assert adaptive_calls == eager_calls - 3


class _WrongBackward(torch.autograd.Function):
    """tanh(W x) whose backward is off by ``scale`` in one input element."""

    @staticmethod
    def forward(ctx, x, w, scale):
        y = torch.tanh(w @ x)
        ctx.save_for_backward(y, w)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):
        y, w = ctx.saved_tensors
        grad = (g * (1 - y * y)) @ w
        grad[7] = grad[7] * ctx.scale
        return grad, None, None


@pytest.mark.parametrize("scale", [1.5, 1.01, 0.0])
def test_a_wrong_backward_is_still_caught_and_located(monkeypatch, scale):
    w, x = _dense()
    adaptive, eager, _, _ = _both(monkeypatch, lambda x: _WrongBackward.apply(x, w, scale), x)
    assert not adaptive.ok and not eager.ok
    assert _statuses(adaptive) == _statuses(eager)
    # the failing pair is re-checked in full: the element is named
    worst = adaptive.pairs[0].worst
    assert worst and worst[0].input_index == [7]
    assert all(e.input_index == [7] for e in worst if abs(e.analytic - e.numeric) > e.tolerance)


def test_a_kink_still_takes_the_third_node_and_is_flagged(monkeypatch):
    # relu at exactly 0 in some elements: D+ and D- part there, so the central difference is
    # not trusted alone and the kink test sees its three nodes
    x = torch.arange(-N, N + 1, dtype=D) / 100
    assert bool((x == 0).any())
    fn = torch.relu
    adaptive, eager, adaptive_calls, eager_calls = _both(monkeypatch, fn, x)
    assert _statuses(adaptive) == _statuses(eager)
    assert adaptive.pairs[0].status == Status.KINK
    assert adaptive.pairs[0].kinks == eager.pairs[0].kinks > 0
    assert adaptive_calls == eager_calls  # the kinked leaf took its third node
    failing = gc.check(fn, x, mode="fast", kinks="fail")
    assert not failing.ok


def test_a_kink_in_one_input_leaves_the_other_settled(monkeypatch):
    # the calls of the first projections alone: not those taken again without the kinked outputs
    monkeypatch.setattr(fast, "_without_kinked_outputs", lambda ctx, reports, failing: (reports, failing))
    x = torch.arange(-N // 2, N // 2 + 1, dtype=D) / 100
    y = torch.linspace(0.5, 1.5, N + 1, dtype=D)
    adaptive, eager, adaptive_calls, eager_calls = _both(
        monkeypatch, lambda x, y: torch.relu(x) * torch.sin(y), x, y
    )
    assert _statuses(adaptive) == _statuses(eager)
    assert [p.status for p in adaptive.pairs] == [Status.KINK, Status.PASS]
    assert adaptive_calls == eager_calls - 1  # y alone skipped x + 2h


def test_without_room_in_the_error_bars_every_leaf_takes_its_third_node(monkeypatch):
    # error_bars below 1 + rtol: the clear-pass argument does not hold, so nothing is settled
    # early and the report is exactly the eager one
    w, x = _dense()
    adaptive, eager, adaptive_calls, eager_calls = _both(
        monkeypatch, lambda x: torch.sin(torch.tanh(w @ x)), x, error_bars=0.5
    )
    first, second = adaptive.model_dump(), eager.model_dump()
    first.pop("timings")
    second.pop("timings")
    assert first == second
    assert adaptive_calls == eager_calls


def test_a_nondeterministic_forward_is_still_caught(monkeypatch):
    w, x = _dense()
    g = torch.Generator().manual_seed(1)

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ x) + 1e-9 * torch.rand(N, generator=g, dtype=D)

    adaptive, eager, _, _ = _both(monkeypatch, noisy, x)
    assert not adaptive.ok and not eager.ok


def test_a_nondeterministic_backward_is_still_caught(monkeypatch):
    w, x = _dense()
    adaptive, eager, _, _ = _both(monkeypatch, lambda x: NoisyDenseBackward.apply(x, w), x)
    assert [p.status for p in adaptive.pairs] == [Status.NONDETERMINISTIC]
    assert _statuses(adaptive) == _statuses(eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("projections", [1, 3])
def test_every_dtype_and_projection_count_keeps_the_verdict(monkeypatch, dtype, projections):
    w, x = _dense()
    w, x = w.to(dtype), x.to(dtype)
    for fn in (lambda x: torch.sin(torch.tanh(w @ x)), lambda x: _WrongBackward.apply(x, w, 1.05)):
        adaptive, eager, _, _ = _both(monkeypatch, fn, x, projections=projections)
        assert _statuses(adaptive) == _statuses(eager)


def test_with_the_adaptive_node_off_the_batched_path_reports_what_each_leaf_alone_does(monkeypatch):
    w, x = _dense()
    b = torch.linspace(-1, 1, N, dtype=D)
    monkeypatch.setattr(fast_batched, "ADAPTIVE", False)
    fn = lambda x, b: torch.tanh(w @ x + b)  # noqa: E731
    batched = gc.check(fn, x, b, mode="fast").model_dump()
    monkeypatch.setattr(fast_batched, "ENABLED", False)
    by_leaf = gc.check(fn, x, b, mode="fast").model_dump()
    batched.pop("timings")
    by_leaf.pop("timings")
    assert batched == by_leaf


@pytest.mark.parametrize("rows", [4, 24])  # every node at once; x - h and x + h first
def test_each_perturbed_copy_reaches_fn_as_a_fresh_tensor_of_its_own(rows):
    """A copy viewing a batch would let storage-level ops (as_strided) read a neighbour."""
    seen: list[tuple[tuple[int, ...], int, int]] = []

    def record(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for t in (x, w, b):
            storage = t.untyped_storage()
            seen.append((tuple(t.shape), storage.data_ptr(), storage.nbytes() // t.element_size()))
        return torch.nn.functional.linear(x, w, b)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=g, dtype=D)
    w = torch.randn(12, 16, generator=g, dtype=D)
    b = torch.randn(12, generator=g, dtype=D)
    assert gc.check(record, x, w, b, mode="fast").ok
    shapes = {(rows, 16), (12, 16), (12,)}
    assert {shape for shape, _, _ in seen} == shapes
    # every tensor fn saw owns exactly its elements
    assert all(size == math.prod(shape) for shape, _, size in seen)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("shape", [(6, 5), (24, 24)])
def test_the_corpus_and_its_planted_bugs_keep_their_verdicts(monkeypatch, case, shape):
    """Correct functions pass and every planted bug fails, with the third node adaptive or not,
    pair by pair, and the adaptive path never calls fn more often."""
    for bug in ("none", *case.bugs):
        inputs = make_inputs(case, 0, D, shape=shape)
        adaptive, eager, adaptive_calls, eager_calls = _both(monkeypatch, case.bound(bug), *inputs)
        assert _statuses(adaptive) == _statuses(eager), bug
        assert adaptive.ok == (bug == "none"), bug
        assert adaptive_calls <= eager_calls


def test_a_small_layer_with_several_inputs_settles_each_and_locates_a_wrong_weight_gradient(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=D) for s in ((4, 16), (8, 16), (8,)))
    fn = torch.nn.functional.linear
    adaptive, eager, adaptive_calls, eager_calls = _both(monkeypatch, fn, x, w, b)
    assert adaptive.ok and eager.ok
    assert adaptive_calls == eager_calls - 3  # no leaf needed x + 2h

    class WrongWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return torch.nn.functional.linear(x, w, b)

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            grad_w = grad.T @ x
            grad_w[2, 5] *= 1.02
            return grad @ w, grad_w, grad.sum(0)

    adaptive, eager, _, _ = _both(monkeypatch, WrongWeight.apply, x, w, b)
    assert _statuses(adaptive) == _statuses(eager)
    assert [p.status for p in adaptive.pairs] == [Status.PASS, Status.FAIL, Status.PASS]
    assert adaptive.pairs[1].worst[0].input_index == [2, 5]
