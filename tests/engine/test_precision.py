"""TF32 off while a check runs on CUDA, its settings put back after, through either of torch's APIs.

The settings are process state that CPU builds of torch hold too, so this runs everywhere; that a
float32 convolution then passes on a GPU is tests/cuda's part. The scenarios that use torch's newer
API run in a fresh interpreter: once used, it makes the older getters raise for the whole process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import gradcheck_svc as gc
from gradcheck_svc.engine.precision import on_cuda, tf32_off


def _state() -> tuple[str, bool]:
    return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_allowed():
    before = _state()
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def test_off_inside_and_put_back_after(tf32_allowed):
    with tf32_off(True) as was_allowed:
        assert _state() == ("highest", False)
    assert was_allowed and _state() == ("high", True)


def test_inactive_changes_nothing(tf32_allowed):
    with tf32_off(False) as was_allowed:
        assert _state() == ("high", True)
    assert not was_allowed


def test_overlapping_checks_restore_once_the_last_ends(tf32_allowed):
    """A server runs checks in several threads: the first to end must not turn TF32 back on
    under the others."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[str, bool]] = []

    def second() -> None:
        first_in.wait()
        with tf32_off(True):
            second_in.set()
            first_out.wait()
            seen.append(_state())

    thread = threading.Thread(target=second)
    thread.start()
    with tf32_off(True):
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert seen == [("highest", False)]
    assert _state() == ("high", True)


def test_settings_put_back_when_the_check_raises(tf32_allowed):
    with pytest.raises(ZeroDivisionError), tf32_off(True):
        raise ZeroDivisionError
    assert _state() == ("high", True)


@pytest.mark.parametrize(
    "setup",
    [
        'torch.backends.cuda.matmul.fp32_precision = "tf32"',
        'torch.backends.cudnn.conv.fp32_precision = "ieee"',  # conv and rnn differ: old getters refuse
    ],
)
def test_newer_api_is_used_where_the_process_used_it(setup):
    script = textwrap.dedent(
        f"""
        import torch
        from gradcheck_svc.engine.precision import tf32_off
        {setup}
        backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
        before = [b.fp32_precision for b in backends]
        with tf32_off(True) as was_allowed:
            inside = [b.fp32_precision for b in backends]
        after = [b.fp32_precision for b in backends]
        assert was_allowed, before
        assert inside == ["ieee"] * 3, inside
        assert after == before, (before, after)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cpu_checks_leave_the_settings_alone(tf32_allowed):
    """A check on the CPU neither changes the settings nor notes TF32."""
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(_state())
        return torch.tanh(x @ x.T)

    report = gc.check(fn, torch.randn(3, 4, dtype=torch.float32))
    assert report.ok and set(seen) == {("high", True)}
    assert not any("TF32" in note for note in report.notes)
    assert not on_cuda(torch.device("cpu"), fn, [torch.randn(2)])
    assert not on_cuda(None, fn, [torch.randn(2)])
