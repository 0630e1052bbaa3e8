"""Bound what a check allocates and how long it runs, at the level where torch does the work.

A ``CheckGuard`` is a ``TorchDispatchMode``: every aten op a check runs (the function, its
backward, the engine's own batching, under vmap or not) passes through ``__torch_dispatch__``.
There the guard

- counts the bytes of the op's new output storages as live until the last tensor that holds them
  is freed (a weakref finaliser per storage), and raises once live bytes pass the budget;
- looks at the deadline and at cancellation before every op, so a check that runs many ops stops
  within one op of its time, not at the next finite-difference chunk.

Once tripped, every further op raises again, so a caller that catches the first error (vmap's
fallback to a loop, a user's ``try``) cannot keep computing; ``tripped`` keeps the first error
for whoever runs the check to re-raise, whatever the code in between made of it.

``peak_bytes(call)`` measures one call's peak live bytes the same way (the engine sizes its
batches of perturbed copies from it); ``batch_bytes(default)`` is the memory a batch may use under
the guard in force on this thread, if any.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradcheck_svc.errors import CheckCancelledError, LimitExceededError

__all__ = ["ByteMeter", "CheckGuard", "batch_bytes", "batch_rows", "largest_output", "peak_bytes"]

_active = threading.local()  # the CheckGuard running on this thread, if any


_ALIASING: dict[Any, bool] = {}  # op -> whether its outputs alias an input (views, in-place, out=)


_Dispatch = Callable[..., Any]


def _dynamo_disabled_once_loaded(raw: _Dispatch) -> _Dispatch:
    """``raw`` kept out of torch.compile's tracing, without importing torch._dynamo for it.

    torch wraps every mode's ``__torch_dispatch__`` in ``torch._disable_dynamo``, which imports
    torch._dynamo (about a second) at the first op. Until something else has imported it, no
    compiled frame can run, so there is nothing to keep out; from then on, the same wrapper.
    """
    disabled: _Dispatch | None = None

    @functools.wraps(raw)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            disable = getattr(sys.modules.get("torch._dynamo"), "disable", None)
            if disable is None:
                return raw(*args, **kwargs)
            disabled = disable(raw, recursive=True, wrapping=False)
        return disabled(*args, **kwargs)

    return dispatch


class _Mode(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch leaves TorchDispatchMode untyped
    """A dispatch mode whose ``__torch_dispatch__`` imports nothing on its first op."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)  # type: ignore[no-untyped-call]  # untyped in torch
        raw = cls.__dict__.get("__torch_dispatch__")
        if raw is not None:
            cls.__torch_dispatch__ = _dynamo_disabled_once_loaded(raw)  # type: ignore[method-assign]

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # done above, lazily


def _aliases(func: Any) -> bool:
    known = _ALIASING.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = schema is not None and any(r.alias_info is not None for r in schema.returns)
        _ALIASING[func] = known
    return known


class ByteMeter(_Mode):
    """Live and peak bytes of the tensors created by the ops run under it.

    Ops whose outputs alias an input (views, in-place and ``out=`` ops) allocate nothing and are
    not counted; a view keeps its base tensor alive, so its bytes stay counted while it lives.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves TorchDispatchMode untyped
        self.live = 0
        self.peak = 0
        self._sizes: dict[weakref.ref[torch.Tensor], int] = {}

    def _release(self, ref: weakref.ref[torch.Tensor]) -> None:
        self.live -= self._sizes.pop(ref, 0)

    def _count(self, func: Any, out: Any) -> None:
        if _aliases(func):
            return
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                size = t.numel() * t.element_size()
                self._sizes[weakref.ref(t, self._release)] = size
                self.live += size
        if self.live > self.peak:
            self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._count(func, out)
        return out


class CheckGuard(ByteMeter):
    """A ByteMeter that enforces a memory budget, a deadline and cancellation at every op."""

    def __init__(
        self,
        *,
        max_bytes: int,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.cancelled = cancelled
        self.tripped: Exception | None = None
        self._previous: CheckGuard | None = None

    def __enter__(self) -> CheckGuard:
        self._previous = getattr(_active, "guard", None)
        _active.guard = self
        super().__enter__()  # type: ignore[no-untyped-call]  # torch leaves TorchDispatchMode untyped
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)  # type: ignore[no-untyped-call]  # torch leaves TorchDispatchMode untyped
        _active.guard = self._previous

    def _trip(self, error: Exception) -> None:
        if self.tripped is None:
            self.tripped = error
        raise type(self.tripped)(str(self.tripped))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.tripped is not None:
            self._trip(self.tripped)
        if self.cancelled is not None and self.cancelled():
            self._trip(CheckCancelledError("the check was cancelled"))
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self._trip(LimitExceededError("deadline exceeded: the check did not finish in the time allowed"))
        out = func(*args, **(kwargs or {}))
        self._count(func, out)
        if self.live > self.max_bytes:
            del out  # freed before the error travels up the stack
            self._trip(
                LimitExceededError(
                    f"the check needs more than {self.max_bytes} bytes of memory "
                    f"(max_check_bytes={self.max_bytes})"
                )
            )
        return out


def peak_bytes(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result and the peak live bytes of the storages it created."""
    with ByteMeter() as meter:
        result = call()
    return result, meter.peak


def batch_rows(one_bytes: int, one_seconds: float, default_bytes: int, op_seconds: float = 0.25) -> int:
    """How many copies one batched evaluation may carry: within the batch memory (``batch_bytes``)
    and, under a CheckGuard, short enough that one batched op cannot outlast the deadline by much
    (the guard looks at the clock between ops, never inside one)."""
    rows = batch_bytes(default_bytes) // max(1, one_bytes)
    if getattr(_active, "guard", None) is not None and one_seconds > 0:
        rows = min(rows, int(op_seconds / one_seconds))
    return max(1, rows)


def batch_bytes(default: int) -> int:
    """Memory one batch of perturbed evaluations may use: ``default``, or a quarter of the budget of
    the CheckGuard on this thread when that is smaller."""
    guard: CheckGuard | None = getattr(_active, "guard", None)
    if guard is None:
        return default
    return max(1, min(default, guard.max_bytes // 4))


class _LargestOutput(_Mode):
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves TorchDispatchMode untyped
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_output(fn: Callable[..., Any], inputs: Sequence[Any]) -> int:
    """Elements of the largest tensor ``fn`` creates at these inputs' shapes and dtypes, found on
    the meta device (no data, no time): a size check before anything is allocated. Arguments
    that are not tensors (constants of the call) pass as they are."""
    meta = [
        torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]
    mode = _LargestOutput()
    with mode:
        fn(*meta)
    return max([mode.largest, *(t.numel() for t in meta if isinstance(t, torch.Tensor))])
