"""Small checks run torch's ops on one thread.

A small check is a few hundred ops on tensors of at most a few thousand elements. Where torch
splits such an op over its thread pool, the split costs more than the op, and far more on a
machine whose cores are busy: every parallel region waits until each of its threads gets a core
(measured on 2 busy cores: ``F.linear`` on a 4x16 input, 8 ms on one thread, 90 ms on two).

torch's thread count is process state that threads started later copy when they first run a
parallel op, so it is changed only while no other Python thread runs (a library call or a test,
not a threaded server), and put back as it was when the check ends. A server sets it once, at
start-up, for every check it runs (``use_threads``, setting ``torch_threads``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["largest_batch", "serial_if_small", "use_threads"]

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


@contextlib.contextmanager
def serial_if_small(batch_elements: int) -> Iterator[None]:
    """torch on one thread inside the block when the check is small (its largest batch holds at
    most ``_SMALL_BATCH`` elements) and no other thread can notice."""
    if not _OPENMP or batch_elements > _SMALL_BATCH or threading.active_count() != 1:
        yield
        return
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_threads(count: int) -> None:
    """torch on ``count`` threads from now on in this process. Call it before any other thread runs
    a torch op: a thread keeps the count it saw at its first parallel op."""
    if count < 1:
        raise ValueError(f"torch needs at least one thread, not {count}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
