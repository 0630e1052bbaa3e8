"""float32 checks on CUDA run with TF32 off.

On Ampere and later GPUs, cuDNN convolutions use TensorFloat-32 by default (and matrix products too
where ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32`` asked for it): 10 mantissa
bits, products about 1e-3 off. A correct float32 backward checked that way differs from the float64
finite differences by far more than float32's rounding, and the check would fail correct code. So,
as torch's own test suite does (``tf32_off``), every call of fn and of its backward inside a check on
CUDA runs with TF32 off; the settings are put back when the last such check in the process ends.

The settings are process state. Checks may overlap (a server runs several at once), so the first
check to start saves them and the last to end restores them. torch has two APIs for them; a
process that set them through the newer one (``fp32_precision``) makes the older getters raise,
so the newer one is used there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["TF32_NOTE", "on_cuda", "tf32_off"]

TF32_NOTE = (
    "TF32 was allowed for float32 work on CUDA (torch.backends.cudnn.allow_tf32 / "
    "float32_matmul_precision); the check ran with it off, so float32 products carry float32's precision"
)

_lock = threading.Lock()
_active = 0
_restore: list[tuple[Callable[[Any], None], Any]] = []  # (setter, value) the last check sets back
_was_allowed = False


def on_cuda(device: torch.device | None, fn: Any, inputs: Sequence[Any]) -> bool:
    """Whether a check runs on CUDA: its device says so, or (no device asked for) an input or a
    parameter of fn lives there."""
    if device is not None:
        return device.type == "cuda"
    if not torch.cuda.is_available():
        return False
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in pytree.tree_leaves(list(inputs))):
        return True
    if isinstance(fn, torch.nn.Module):
        return any(p.is_cuda for p in fn.parameters())
    return False


def _settings() -> list[tuple[Any, Any, Callable[[Any], None]]]:
    """(current value, value with TF32 off, setter) of each setting that decides TF32."""
    try:  # the older API, which torch's own tf32_off uses
        return [
            (torch.backends.cudnn.allow_tf32, False, _set(torch.backends.cudnn, "allow_tf32")),
            (torch.get_float32_matmul_precision(), "highest", torch.set_float32_matmul_precision),
        ]
    except RuntimeError:  # the newer API was used in this process: the older getters refuse
        cudnn: Any = torch.backends.cudnn  # conv and rnn: submodules the stubs do not list
        backends = (torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn)
        return [(b.fp32_precision, "ieee", _set(b, "fp32_precision")) for b in backends]


def _set(owner: Any, name: str) -> Callable[[Any], None]:
    return lambda value: setattr(owner, name, value)


@contextlib.contextmanager
def tf32_off(active: bool) -> Iterator[bool]:
    """TF32 off inside the block when ``active``; yields whether it had been allowed before."""
    global _active, _was_allowed
    if not active:
        yield False
        return
    with _lock:
        if _active == 0:
            _restore.clear()
            _was_allowed = False
            for value, off, setter in _settings():
                if value != off:
                    _was_allowed = _was_allowed or value != "none"  # "none": the parent's, not TF32
                    _restore.append((setter, value))
                    setter(off)
        _active += 1
        was_allowed = _was_allowed
    try:
        yield was_allowed
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                for setter, value in reversed(_restore):
                    setter(value)
                _restore.clear()
