"""Batched forward values of custom autograd.Functions that vmap refuses.

``vmap`` refuses an old-style ``forward(ctx, ...)`` Function, and a new-style one without a
vmap rule, although the numeric side needs forward values only. Outside functorch,
``Function.apply`` runs ``forward`` with a plain context, and under no_grad that records
nothing: the ops inside it batch as any tensor code does. While ``plain_forward_calls`` is
active in a thread, ``Function.apply`` takes that plain path under vmap too (torch asks
``_are_functorch_transforms_active`` to choose, and the single-level Function guard is
lifted for the thread); every other thread, and every other moment, sees torch's own
behaviour.

A batched evaluation is trusted only after a probe: a few rows evaluated both ways must
agree, otherwise the caller keeps its loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator

import torch
from torch._functorch.utils import enable_single_level_autograd_function

from gradcheck_svc.engine.agreement import same_contents, within
from gradcheck_svc.errors import FunctionRaisedError

__all__ = ["batched_plain_forward", "plain_forward_calls"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("plain_forward_active", default=False)
_LOCK = threading.Lock()
_INSTALLED = 0
_TORCH_ASKS = torch._C._are_functorch_transforms_active
_PROBE_ROWS = 3
_PROBE_ULPS = 64.0


def _transforms_active() -> bool:
    # Function.apply asks this to choose between its functorch path (which refuses the
    # Function) and running forward directly; in the active thread, the latter.
    return False if _ACTIVE.get() else _TORCH_ASKS()


@contextlib.contextmanager
def plain_forward_calls() -> Iterator[None]:
    """In this thread, ``Function.apply`` runs ``forward`` directly (values only, no graph)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED == 0:
            torch._C._are_functorch_transforms_active = _transforms_active
        _INSTALLED += 1
    token = _ACTIVE.set(True)
    try:
        with enable_single_level_autograd_function():
            yield
    finally:
        _ACTIVE.reset(token)
        with _LOCK:
            _INSTALLED -= 1
            if _INSTALLED == 0:
                torch._C._are_functorch_transforms_active = _TORCH_ASKS


def batched_plain_forward(
    one: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, machine_eps: float
) -> torch.Tensor | None:
    """``vmap(one)(batch)`` with Functions' forwards called directly; ``None`` when it cannot be trusted.

    The probe: the first and last rows are also evaluated one by one, outside vmap; a
    batched kernel may round differently, so a few ulps are allowed.

    ``batch`` is left as it was, for a fallback and for the caller: a forward that writes into
    its input works on a copy. The probe's plain calls, made first on copies of their rows, tell
    such a forward by the copy (its values, or its version counter where the write keeps them);
    a forward that writes into the batch under vmap although its plain calls did not is refused
    with an error (the version counter of the batch, which every such write under vmap bumps).
    """
    picks = sorted({0, *range(max(0, batch.shape[0] - _PROBE_ROWS + 1), batch.shape[0])})
    looped: list[torch.Tensor] = []
    writes = False
    with torch.no_grad():
        for k in picks:
            row = batch[k]
            copy = row.clone()
            version = copy._version
            try:
                looped.append(one(copy))
            except Exception:  # the loop that follows says what fn raised
                return None
            writes = writes or copy._version != version or not same_contents(row, copy)
    source = batch.clone() if writes else batch
    version = batch._version
    try:
        with torch.no_grad(), plain_forward_calls():
            batched = torch.vmap(one)(source)
    except Exception:  # the forward itself does something vmap cannot batch
        batched = None
    if batch._version != version:
        raise FunctionRaisedError(
            "fn wrote into its input in a batched evaluation but not in a plain call; "
            "write into a copy (x = x.clone()) or mark it with ctx.mark_dirty"
        )
    if batched is None:
        return None
    probe = batched[picks]
    stacked = torch.stack(looped)
    scale = stacked.abs().nan_to_num(nan=0.0, posinf=0.0)
    allowed = _PROBE_ULPS * machine_eps * (scale + scale.max())
    if probe.shape != stacked.shape or not within(probe, stacked, allowed):
        return None
    if batched.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr():
        return batched.clone()  # fn returned its input: the values, not the caller's batch
    return batched
