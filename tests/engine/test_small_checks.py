"""Small checks: plain calls for a few perturbed copies, no reference cycles, flat argument lists."""

from __future__ import annotations

import gc
import math
import random
import weakref
from typing import Any

import pytest
import torch

import gradcheck_svc as gcs
from gradcheck_svc.engine import api, tiny

D = torch.float64


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_a_scalar_check_calls_fn_plainly_never_under_vmap(mode: str) -> None:
    seen: list[bool] = []

    def square(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch._C._functorch.is_batchedtensor(x))
        return x**2 if x.item() > 0 else -(x**2)  # .item(): vmap could not batch it anyway

    report = gcs.check(square, torch.tensor(9.0, dtype=D), mode=mode)
    assert report.ok
    if mode == "full":
        assert report.pairs[0].analytic == pytest.approx([18.0])
    assert not any(seen)
    # the first call, three nodes and the repeat of f(x) that watches for nondeterminism
    assert len(seen) == 5
    assert not any("vmap" in note or "one at a time" in note for note in report.notes)


def test_a_scalar_check_catches_a_wrong_backward_and_nondeterminism() -> None:
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x**2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            return g * 2.02 * x

    x = torch.tensor(9.0, dtype=D)
    for mode in ("full", "fast"):
        assert not gcs.check(Wrong.apply, x, mode=mode).ok
        noisy = gcs.check(lambda x: x * (1 + 1e-3 * torch.rand((), dtype=D)), x, mode=mode)
        assert not noisy.ok
        assert any("not deterministic" in note for note in noisy.notes)


def test_a_check_leaves_no_reference_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small check's state is freed when the check returns, without the cyclic collector."""
    made: list[weakref.ref[Any]] = []
    real = api.Context

    def recording(*args: Any, **kwargs: Any) -> Any:
        ctx = real(*args, **kwargs)
        made.append(weakref.ref(ctx))
        return ctx

    monkeypatch.setattr(api, "Context", recording)
    w = torch.randn(2, 3, dtype=D)
    gc.disable()
    try:
        for fn, inputs in [
            (lambda x: x**2, (torch.tensor(9.0, dtype=D),)),
            (lambda u, v: u * v + u**2 + v**3, (torch.tensor(2.0, dtype=D), torch.tensor(4.0, dtype=D))),
            (lambda x: torch.tanh(w @ x), (torch.randn(3, dtype=D),)),
        ]:
            for mode in ("full", "fast"):
                report = gcs.check(fn, *inputs, mode=mode)
                assert report.ok
        assert len(made) == 6
        assert all(ref() is None for ref in made)
    finally:
        gc.enable()


def test_inputs_that_are_not_one_tensor_each_still_reach_fn_as_given() -> None:
    """A list input and a None keep their places (the fast call path is for flat argument lists)."""
    x, a, b = (torch.tensor(v, dtype=D) for v in (2.0, 3.0, 4.0))

    def fn(x: torch.Tensor, pair: list[torch.Tensor], nothing: None, scale: float) -> torch.Tensor:
        assert nothing is None
        return x * pair[0] * pair[1] * scale

    report = gcs.check(fn, x, [a, b], None, 0.5)
    assert report.ok
    assert [p.analytic[0] for p in report.pairs] == pytest.approx([6.0, 4.0, 3.0])


def test_the_worst_elements_are_picked_in_torchs_order() -> None:
    """The float path ranks the worst elements as torch.topk does, ties included."""
    rng = random.Random(0)
    for _ in range(3000):
        size = rng.randint(1, 12)
        key = [rng.choice([0.0, 1.0, -1.0, rng.random(), 10 * rng.random(), math.inf]) for _ in range(size)]
        k = rng.randint(1, size)
        assert tiny._top(key, k) == torch.tensor(key, dtype=D).topk(k).indices.tolist(), (key, k)


def test_tensor_inputs_reach_fn_in_place_of_their_names() -> None:
    """Positional tensors, some not differentiated, reach fn in order; names and checked inputs follow."""
    x, w = torch.tensor([1.0, 2.0], dtype=D), torch.tensor([3.0, -1.0], dtype=D)
    index = torch.tensor([1, 0])
    report = gcs.check(lambda x, i, w: (x[i] * w).sum(), x, index, w, input_names=["x", "i", "w"])
    assert report.ok
    analytic = {p.input: p.analytic for p in report.pairs}
    assert analytic == {"x": pytest.approx([-1.0, 3.0]), "w": pytest.approx([2.0, 1.0])}


class _CountingSine:
    """An external source of sin: every evaluate call would be a round trip."""

    output_names = ["output"]  # noqa: RUF012 - the protocol's attribute
    has_jvp = False

    def __init__(self) -> None:
        self.batches: list[int] = []

    def evaluate(self, inputs: Any) -> list[torch.Tensor]:
        self.batches.append(inputs[0].shape[0])
        return [torch.sin(inputs[0])]

    def vjp(self, inputs: Any, cotangents: Any, wanted: Any) -> list[torch.Tensor | None]:
        return [cotangents[0] * torch.cos(inputs[0])]

    def jvp(self, inputs: Any, tangents: Any) -> list[torch.Tensor]:
        raise NotImplementedError


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_an_external_scalar_function_keeps_its_perturbations_in_one_batch(mode: str) -> None:
    """Plain calls are for functions whose calls are cheap, not for round trips."""
    from gradcheck_svc.engine.external import external_function

    source = _CountingSine()
    report = gcs.check(external_function(source, "sine"), torch.tensor(0.5, dtype=D), mode=mode)
    assert report.ok
    assert max(source.batches) > 1  # the perturbed copies travel together


def test_each_perturbed_copy_reaches_fn_as_a_fresh_tensor_of_the_inputs_shape() -> None:
    seen: list[tuple[tuple[int, ...], int]] = []

    def record(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(u.shape), u.data_ptr()))
        return u * v + u**2 + v**3

    u, v = torch.tensor(2.0, dtype=D), torch.tensor(4.0, dtype=D)
    report = gcs.check(record, u, v)
    assert report.ok
    assert [pair.analytic[0] for pair in report.pairs] == pytest.approx([8.0, 50.0])
    assert all(shape == () for shape, _ in seen)
    perturbed_u = seen[1:5]  # after the first call: three nodes of u and f(x) again
    assert len({pointer for _, pointer in perturbed_u}) == len(perturbed_u)


def test_a_transposed_input_reaches_fn_as_given_and_its_gradient_keeps_logical_order() -> None:
    """fn gets the user's layout (a backward may depend on it: test_edge_layout.py), so code that
    cannot take the user's own input raises here as it does when the user calls it."""
    x = torch.arange(6, dtype=D).reshape(3, 2).T  # (2, 3), not contiguous
    weights = torch.arange(1.0, 7.0, dtype=D).reshape(2, 3)
    seen = []

    def weighted(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.stride())
        return (t.reshape(-1) ** 2 * weights.view(-1)).sum()

    report = gcs.check(weighted, x, mode="full")
    assert report.ok
    assert set(seen) == {x.stride()}
    expected = (2 * x.contiguous() * weights).reshape(-1).tolist()
    assert report.pairs[0].analytic == pytest.approx(expected)
    with pytest.raises(RuntimeError):
        x.view(-1)  # as fn written with view() raises on the user's own input ...
    with pytest.raises(gcs.FunctionRaisedError, match="view size"):
        gcs.check(lambda t: (t.view(-1) ** 2).sum(), x, mode="full")  # ... so it does here


@pytest.mark.parametrize("tiny_path", [True, False])
@pytest.mark.parametrize("order", [1, 2])
def test_scalar_and_matrix_outputs_give_the_exact_jacobian(
    monkeypatch: pytest.MonkeyPatch, tiny_path: bool, order: int
) -> None:
    """The backward starts at fn's own output (a 0-d or 2-D tensor), not at its flat view."""
    monkeypatch.setattr(tiny, "ENABLED", tiny_path)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D)
    x = torch.tensor([0.5, -1.5], dtype=D)
    matrix = gcs.check(lambda x: torch.outer(x, x) + a, x, mode="full", order=order)
    scalar = gcs.check(lambda x: (x**3).sum(), x, mode="full", order=order)
    assert matrix.ok and scalar.ok
    if order == 1:
        # d(x_i x_j)/dx_k = delta_ik x_j + x_i delta_jk, rows in memory order of the 2x2 output
        exact = [[2 * 0.5, 0.0], [-1.5, 0.5], [-1.5, 0.5], [0.0, 2 * -1.5]]
        assert matrix.pairs[0].analytic == pytest.approx([v for row in exact for v in row])
        assert scalar.pairs[0].analytic == pytest.approx([3 * 0.25, 3 * 2.25])


def test_a_wrong_backward_of_a_matrix_output_is_still_located() -> None:
    class HalfWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return x.reshape(2, 2) ** 2

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            grad = g.reshape(-1) * 2 * x
            grad[3] = grad[3] * 1.1
            return grad

    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    report = gcs.check(HalfWrong.apply, x, mode="full")
    assert not report.ok
    worst = report.pairs[0].worst[0]
    assert worst.output_index == [1, 1] and worst.input_index == [3]
