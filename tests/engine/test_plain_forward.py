"""Batched forwards of custom autograd.Functions that vmap refuses, with a looped fallback."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine.plain_forward import _TORCH_ASKS, batched_plain_forward, plain_forward_calls

BATCHED_NOTE = "custom autograd.Function forwards batched with vmap, called directly"


class OldCube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class NewCube(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class CallDependent(torch.autograd.Function):
    """A forward whose value depends on how often it was called: batching changes it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        CallDependent.calls += 1
        return x * CallDependent.calls

    @staticmethod
    def backward(ctx, g):
        return g * CallDependent.calls


def test_old_and_new_style_forwards_batch_and_match_a_loop():
    batch = torch.randn(6, 10, dtype=torch.float64)
    for fn in (OldCube.apply, NewCube.apply):
        out = batched_plain_forward(fn, batch, 2.0**-52)
        assert out is not None
        assert torch.equal(out, batch**3)


def test_a_forward_that_batches_differently_falls_back():
    batch = torch.randn(6, 10, dtype=torch.float64)
    assert batched_plain_forward(CallDependent.apply, batch, 2.0**-52) is None


def test_check_batches_an_old_style_function_and_says_so():
    # A sum: every column perturbed, batches far over the few rows that plain calls take.
    report = gc.check(lambda x: OldCube.apply(x).sum(), torch.randn(40, dtype=torch.float64))
    assert report.ok
    assert BATCHED_NOTE in report.notes
    assert not any("evaluated one at a time" in note for note in report.notes)


def test_check_names_the_loop_when_batching_cannot_be_trusted():
    class Branchy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x if float(x.sum()) > -1e9 else x  # a host read: vmap cannot batch it

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    report = gc.check(lambda x: Branchy.apply(x).sum(), torch.randn(30, dtype=torch.float64))
    assert report.ok
    assert any("evaluated one at a time" in note for note in report.notes)
    assert BATCHED_NOTE not in report.notes


def test_other_threads_keep_torchs_own_behaviour():
    seen: list[str] = []

    def other() -> None:
        try:
            torch.vmap(OldCube.apply)(torch.randn(3, 4, dtype=torch.float64))
            seen.append("batched")
        except RuntimeError:
            seen.append("refused")

    with plain_forward_calls():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen == ["refused"]
    # And once the block is left, this thread too.
    try:
        torch.vmap(OldCube.apply)(torch.randn(3, 4, dtype=torch.float64))
        refused = False
    except RuntimeError:
        refused = True
    assert refused


def test_a_forward_that_writes_into_its_input_keeps_its_verdict():
    class DoubleInPlace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.mark_dirty(x)
            return x.mul_(2)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def fn(x):
        return DoubleInPlace.apply(x.clone()) ** 2

    x = torch.randn(30, dtype=torch.float64)
    report = gc.check(fn, x)
    assert report.ok

    def writes_its_argument(x):
        return DoubleInPlace.apply(x * 1.0) + x

    assert gc.check(writes_its_argument, x).ok


def test_concurrent_checks_under_the_guard_leave_other_threads_alone():
    """Threads checking Functions under the per-op guard (as server workers do) batch their
    forwards, while threads vmapping the same Function outside a check are refused by torch
    as always, and every verdict is right, whatever the interleaving."""
    from gradcheck_svc.engine.guard import CheckGuard

    rounds = 6
    start = threading.Barrier(6)
    errors: list[BaseException] = []
    outcomes: dict[str, list[object]] = {"check": [], "plain": []}

    def checker(seed: int) -> None:
        try:
            start.wait()
            for k in range(rounds):
                x = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + k))
                with CheckGuard(max_bytes=2**30):
                    report = gc.check(lambda x: OldCube.apply(x).sum(), x)
                outcomes["check"].append((report.ok, BATCHED_NOTE in report.notes))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def bystander() -> None:
        try:
            start.wait()
            x = torch.randn(4, dtype=torch.float64)
            for _ in range(rounds * 20):
                # torch's own refusal, with its own reason, and a functorch transform that works.
                try:
                    torch.vmap(OldCube.apply)(torch.randn(3, 4, dtype=torch.float64))
                    outcomes["plain"].append("batched")
                except RuntimeError as exc:
                    outcomes["plain"].append("refused" if "setup_context" in str(exc) else str(exc)[:80])
                grad = torch.func.grad(lambda t: NewCube.apply(t).sum())(x)
                outcomes["plain"].append("grad" if torch.allclose(grad, 3 * x * x) else "wrong grad")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=checker, args=(100 * n,)) for n in range(4)]
    threads += [threading.Thread(target=bystander) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert outcomes["check"] == [(True, True)] * (4 * rounds)
    assert sorted(set(outcomes["plain"])) == ["grad", "refused"]
    assert len(outcomes["plain"]) == 2 * 2 * rounds * 20
    assert torch._C._are_functorch_transforms_active is _TORCH_ASKS


def _writing(write: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An old-style Function (vmap refuses it) that writes into its input with ``write``, then
    returns the sine of what its input held when it was called."""

    class Writes(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.sin(x)
            write(x)
            return y

        @staticmethod
        def backward(ctx, g):
            raise NotImplementedError

    return Writes.apply


def _numpy_add(x: torch.Tensor) -> None:
    view = x.numpy()
    view += 1.0


WRITE_ROUTES = {
    "in place": lambda x: x.add_(1.0),
    "through .data": lambda x: x.data.add_(1.0),
    "through detach()": lambda x: x.detach().mul_(3.0),
    "into a view": lambda x: x.view(-1)[:1].fill_(7.0),
    "by item assignment": lambda x: x.__setitem__(0, 5.0),
    "through a numpy view": _numpy_add,
    # the probe rows are positive: only the version counter tells this write there
    "keeping some values": lambda x: x.clamp_(min=0.0),
}


@pytest.mark.parametrize("route", list(WRITE_ROUTES))
def test_a_forward_that_writes_into_its_input_leaves_the_batch_alone(route):
    batch = torch.randn(8, 5, dtype=torch.float64)
    batch[0], batch[-2:] = batch[0].abs() + 0.1, batch[-2:].abs() + 0.1
    original = batch.clone()
    fn = _writing(WRITE_ROUTES[route])
    out = batched_plain_forward(fn, batch, 2.0**-52)
    assert torch.equal(batch, original)  # the caller's perturbations, as they were
    if out is not None:  # batched on a copy: every row's value at its own point
        assert torch.allclose(out, torch.sin(original), rtol=1e-12, atol=0)


@pytest.mark.parametrize("route", list(WRITE_ROUTES))
def test_a_check_of_a_forward_that_writes_into_its_input_passes(route):
    write = WRITE_ROUTES[route]

    class Writes(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x.clone())
            y = x * torch.sigmoid(x)
            write(x)
            return y

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return g * (s + x * s * (1 - s))

    def fn(x):
        return Writes.apply(x.clone())

    x = torch.linspace(-2, 2, 40, dtype=torch.float64)
    report = gc.check(fn, x)
    assert report.ok, report

    # The same bug twin is caught: a wrong verdict cannot hide behind the writes.
    class Wrong(Writes):
        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.sigmoid(x)

    assert not gc.check(lambda x: Wrong.apply(x.clone()), x).ok


def test_a_forward_that_writes_only_when_batched_is_refused_clearly():
    calls = itertools.count()

    def later_calls_write(x):
        if next(calls) >= 3:  # the probe's plain calls come first, the batched call after
            x.add_(1.0)

    batch = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(gc.FunctionRaisedError, match="wrote into its input in a batched evaluation"):
        batched_plain_forward(_writing(later_calls_write), batch, 2.0**-52)


def test_a_forward_that_returns_its_input_gives_values_apart_from_the_batch():
    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    batch = torch.randn(6, 4, dtype=torch.float64)
    out = batched_plain_forward(Identity.apply, batch, 2.0**-52)
    assert out is not None and torch.equal(out, batch)
    batch.zero_()
    assert bool((out != 0).any())
