"""Small checks run torch on one thread while no other thread runs, and leave the count as it was."""

from __future__ import annotations

import threading

import pytest
import torch

import gradcheck_svc as gc

D = torch.float64


def _threads_seen(x: torch.Tensor, other_thread: bool = False) -> tuple[set[int], int]:
    """The thread counts fn saw during a check of ``x``, and the count after it."""
    seen: set[int] = set()

    def fn(t: torch.Tensor) -> torch.Tensor:
        seen.add(torch.get_num_threads())
        return torch.sin(t)

    stop = threading.Event()
    waiter = threading.Thread(target=stop.wait) if other_thread else None
    if waiter is not None:
        waiter.start()
    try:
        assert gc.check(fn, x).ok
    finally:
        stop.set()
        if waiter is not None:
            waiter.join()
    return seen, torch.get_num_threads()


@pytest.fixture
def two_threads():
    if threading.active_count() != 1:
        pytest.fail(f"this test needs a process with one thread; {threading.enumerate()}")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_small_check_runs_on_one_thread_and_restores_the_count(two_threads):
    seen, after = _threads_seen(torch.randn(3, 4, dtype=D))
    assert 1 in seen
    assert after == 2


def test_a_large_check_keeps_the_threads(two_threads):
    seen, after = _threads_seen(torch.randn(400, dtype=D))
    assert seen == {2}
    assert after == 2


def test_another_running_thread_keeps_the_count_unchanged(two_threads):
    # Threads started later copy the process's count: it is left alone while one could start.
    seen, after = _threads_seen(torch.randn(3, 4, dtype=D), other_thread=True)
    assert seen == {2}
    assert after == 2
