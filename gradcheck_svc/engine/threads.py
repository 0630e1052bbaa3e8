"""Small checks run torch's ops on one thread.

A small check is a few hundred ops on tensors of at most a few thousand elements. Where torch
splits such an op over its thread pool, the split costs more than the op, and far more on a
machine whose cores are busy: every parallel region waits until each of its threads gets a core
(measured on 2 busy cores: ``F.linear`` on a 4x16 input, 8 ms on one thread, 90 ms on two).

The first call of fn, which shows the outputs, runs under a count guessed from the inputs: on busy
cores, a dense fn's first call on two threads took as long as the rest of its check on one.

torch's thread count is process state that threads started later copy when they first run a
parallel op, so it is changed only while no other Python thread runs (a library call or a test,
not a threaded server), and put back as it was when the check ends. A server sets it once, at
start-up, for every check it runs (``use_threads``, setting ``torch_threads``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["check_batch", "guessed_batch", "largest_batch", "serial_if_small", "use_threads"]

# A check whose largest batch (three perturbed copies of every column it perturbs at once, each
# with its outputs) holds up to this many elements (2 MiB of float64) is a small check.
_SMALL_BATCH = 1 << 18
# Only where OpenMP runs torch's threads: another backend cannot change the count once it has run.
_OPENMP: bool = torch.backends.openmp.is_available()  # type: ignore[no-untyped-call]  # untyped in torch


def largest_batch(n_inputs: int, n_outputs: int, perturbed: int) -> int:
    """Elements of the largest batch a check builds when it perturbs ``perturbed`` directions at
    once (every column in full mode, the projections in fast mode): three nodes each, inputs
    and outputs."""
    return 3 * perturbed * (n_inputs + n_outputs)


def check_batch(
    n_inputs: int, n_outputs: int, leaves: int, mode: str, projections: int, threshold: int
) -> int:
    """``largest_batch`` of a check in ``mode``: fast mode perturbs ``projections`` directions of
    each of its ``leaves``, full mode every column; "auto" is fast above ``threshold`` Jacobian
    entries."""
    fast = mode == "fast" or (mode == "auto" and n_inputs * n_outputs > threshold)
    return largest_batch(n_inputs, n_outputs, projections * leaves if fast else n_inputs)


def guessed_batch(fn: Any, inputs: Sequence[Any], mode: str, projections: int, threshold: int) -> int:
    """``check_batch`` before the first call has shown fn's outputs: from the floating input
    tensors given (and a module's parameters), with as many outputs as inputs."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if isinstance(fn, torch.nn.Module):
        tensors += list(fn.parameters())
    floating = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    n = sum(t.numel() * (2 if t.is_complex() else 1) for t in floating)
    return check_batch(n, n, max(len(floating), 1), mode, projections, threshold)


@contextlib.contextmanager
def serial_if_small(batch_elements: int) -> Iterator[Callable[[int], None]]:
    """torch on one thread inside the block while the check is small (its largest batch holds at
    most ``_SMALL_BATCH`` elements) and no other thread can notice. Yields ``resize``: the block
    tells it the check's largest batch once it knows better (after the first call of fn)."""
    before = torch.get_num_threads()
    serial = False  # whether the count is ours (1) now

    def resize(elements: int) -> None:
        nonlocal serial
        if not _OPENMP or before == 1 or threading.active_count() != 1:
            return
        if serial != (elements <= _SMALL_BATCH):
            serial = not serial
            torch.set_num_threads(1 if serial else before)

    resize(batch_elements)
    try:
        yield resize
    finally:
        if serial:
            torch.set_num_threads(before)


def use_threads(count: int) -> None:
    """torch on ``count`` threads from now on in this process. Call it before any other thread runs
    a torch op: a thread keeps the count it saw at its first parallel op."""
    if count < 1:
        raise ValueError(f"torch needs at least one thread, not {count}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
