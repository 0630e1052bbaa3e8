"""Small checks run torch on one thread while no other thread runs, and leave the count as it was.

Each case runs in a fresh interpreter: a test process may hold threads of its own (earlier tests'
servers and pipes), and the engine rightly leaves the count alone then.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = """
import json, sys, threading
import torch
import gradcheck_svc as gc

size, other_thread, mode = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
repeats = int(sys.argv[4])
torch.set_num_threads(2)
seen = []

def fn(t):
    if not seen or seen[-1] != torch.get_num_threads():
        seen.append(torch.get_num_threads())
    return torch.sin(t).repeat(repeats)

stop = threading.Event()
waiter = threading.Thread(target=stop.wait)
if other_thread:
    waiter.start()
ok = gc.check(fn, torch.randn(size, dtype=torch.float64), mode=mode).ok
stop.set()
if other_thread:
    waiter.join()
print(json.dumps(dict(ok=ok, seen=seen, after=torch.get_num_threads())))
"""


def _threads_seen(size: int, other_thread: bool = False, mode: str = "auto", repeats: int = 1) -> dict:
    """The thread counts fn saw during a check of ``size`` elements, in the order of its calls
    (each change once), and the count after it; fn's output is its input ``repeats`` times."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size), "1" if other_thread else "0", mode, str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    return result


@pytest.mark.parametrize("size", [1, 12])
def test_a_small_check_runs_on_one_thread_and_restores_the_count(size):
    result = _threads_seen(size)
    # The first call too: its inputs say the check is small before its outputs show it.
    assert result["seen"] == [1]
    assert result["after"] == 2


def test_outputs_that_make_the_check_large_give_the_threads_back_after_the_first_call():
    # 12 inputs guess a small check; 12 x 800 outputs make every batch large.
    result = _threads_seen(12, repeats=800, mode="full")
    assert result["seen"] == [1, 2]
    assert result["after"] == 2


def test_a_large_check_keeps_the_threads():
    result = _threads_seen(400)
    assert result["seen"] == [2]
    assert result["after"] == 2


def test_fast_mode_on_a_large_input_perturbs_few_directions_on_one_thread():
    # The same 400 elements that keep the threads in full mode: fast mode's batches are a few rows.
    result = _threads_seen(400, mode="fast")
    assert result["seen"] == [1]
    assert result["after"] == 2


def test_another_running_thread_keeps_the_count_unchanged():
    # Threads started later copy the process's count: it is left alone while one could start.
    result = _threads_seen(12, other_thread=True)
    assert result["seen"] == [2]
    assert result["after"] == 2
