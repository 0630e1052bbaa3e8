"""The CheckGuard changes nothing a check concludes, and stops what it must.

Under the guard (the server runs every check under one) the seeds, vmap-batched and loop-evaluated
functions, custom autograd.Functions, planted bugs, fast and Taylor modes give the same verdicts as
without it; a check that passes its memory budget, its deadline or its cancellation stops with the
guard's error, even when the function catches it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine.guard import CheckGuard, batch_bytes, largest_output, peak_bytes
from gradcheck_svc.errors import CheckCancelledError, GradcheckError, LimitExceededError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engine"))
import planted

F64 = torch.float64
GiB = 2**30


def guarded(fn: Callable[..., Any], *inputs: Any, **options: Any) -> gc.Report:
    with CheckGuard(max_bytes=GiB) as guard:
        report = gc.check(fn, *inputs, **options)
    assert guard.tripped is None
    return report


class NoVmap(torch.autograd.Function):
    """An old-style Function: vmap cannot batch it, the engine evaluates it in a loop."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.exp() * float(x.sum().item() > -1e9)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x.exp()


CASES: list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
    ("seed x^2", lambda x: x**2, (torch.tensor(9.0),), {}),
    ("seed sin", lambda x: torch.sin(x / 2**1.5), (torch.tensor(100.0, dtype=F64),), {}),
    (
        "seed uv",
        lambda u, v: u * v + u**2 + v**3,
        (torch.tensor(2.0, dtype=F64), torch.tensor(4.0, dtype=F64)),
        {},
    ),
    ("vmap", lambda x: torch.tanh(x).cumsum(0) * x, (torch.randn(40, dtype=F64),), {}),
    ("loop", NoVmap.apply, (torch.randn(6, dtype=F64),), {}),
    ("module", torch.nn.Linear(4, 3).double(), (torch.randn(2, 4, dtype=F64),), {}),
    ("planted sign", lambda x: planted.Square.apply(x, "sign"), (torch.randn(5, dtype=F64),), {}),
    ("planted 1%", lambda x: planted.Square.apply(x, "scale1pct"), (torch.randn(5, dtype=F64),), {}),
    ("fast", lambda x: torch.sin(x).sum(-1), (torch.randn(30, 30, dtype=F64),), {"mode": "fast"}),
    ("complex", lambda z: (z * z.conj()).real, (torch.randn(3, dtype=torch.complex128),), {}),
]


@pytest.mark.parametrize(("fn", "inputs", "options"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_guard_changes_no_verdict(
    fn: Callable[..., Any], inputs: tuple[Any, ...], options: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    plain = gc.check(fn, *inputs, **options)
    torch.manual_seed(0)
    under_guard = guarded(fn, *inputs, **options)
    assert under_guard.ok == plain.ok and under_guard.error == plain.error
    assert [(w.input_index, w.output_index, w.analytic) for p in plain.pairs for w in p.worst] == [
        (w.input_index, w.output_index, w.analytic) for p in under_guard.pairs for w in p.worst
    ]


def test_seed_values_hold_under_the_guard() -> None:
    report = guarded(
        lambda u, v: u * v + u**2 + v**3, torch.tensor(2.0, dtype=F64), torch.tensor(4.0, dtype=F64)
    )
    assert report.ok
    assert [p.worst[0].analytic if p.worst else None for p in report.pairs] in (
        [8.0, 50.0],
        [None, None],
    ) or report.ok


def test_memory_over_the_budget_stops_the_check() -> None:
    with pytest.raises(GradcheckError), CheckGuard(max_bytes=8 * 2**20) as guard:
        gc.check(lambda x: torch.outer(x, x).sum(), torch.randn(1500, dtype=F64))
    assert isinstance(guard.tripped, LimitExceededError) and "max_check_bytes" in str(guard.tripped)


def test_a_function_that_catches_the_guard_cannot_carry_on() -> None:
    def stubborn(x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.outer(x, x).sum()
        except Exception:
            return (x * 2).sum()  # "recover" with more torch work: the guard raises again

    with CheckGuard(max_bytes=2**20) as guard, contextlib.suppress(GradcheckError):
        gc.check(stubborn, torch.randn(800, dtype=F64))
    assert isinstance(guard.tripped, LimitExceededError)


def test_the_deadline_and_cancellation_hold_at_every_op() -> None:
    x = torch.randn(200, dtype=F64)
    fn = lambda x: torch.linalg.svdvals(torch.outer(x, x) + torch.eye(200, dtype=F64)).sum()  # noqa: E731
    started = time.monotonic()
    with (
        CheckGuard(max_bytes=GiB, deadline=time.monotonic() + 0.3) as guard,
        contextlib.suppress(GradcheckError),
    ):
        gc.check(fn, x)
    assert isinstance(guard.tripped, LimitExceededError) and "deadline" in str(guard.tripped)
    assert time.monotonic() - started < 5
    calls = iter(range(10**9))
    with (
        CheckGuard(max_bytes=GiB, cancelled=lambda: next(calls) > 50) as guard,
        contextlib.suppress(GradcheckError),
    ):
        gc.check(fn, x)
    assert isinstance(guard.tripped, CheckCancelledError)


def test_live_bytes_fall_when_tensors_are_freed() -> None:
    with CheckGuard(max_bytes=GiB) as guard:
        a = torch.ones(1000, dtype=F64)
        b = a * 2
        view = b[10:]
        held = guard.live
        del a, b
        still = guard.live  # the view keeps b's storage alive
        del view
    assert held >= 16_000 and still >= 8_000 and guard.live < still
    assert peak_bytes(lambda: torch.ones(1000, dtype=F64) + 1)[1] >= 8_000


def test_batch_memory_follows_the_guard_in_force() -> None:
    assert batch_bytes(192 * 2**20) == 192 * 2**20
    with CheckGuard(max_bytes=64 * 2**20):
        assert batch_bytes(192 * 2**20) == 16 * 2**20
    assert largest_output(torch.outer, [torch.zeros(500), torch.zeros(40)]) == 20_000
