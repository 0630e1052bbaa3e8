"""Inputs that are not contiguous reach fn as the user passed them.

A backward written for contiguous memory (a kernel that indexes by ``i * cols + j``, Python that
reads the storage with ``as_strided``) is wrong only for a transposed or channels-last input.
The checker used to hand fn contiguous copies of every input, so such a bug passed in every mode.
"""

from __future__ import annotations

import pytest
import torch

import gradcheck_svc as gc


class RowScale(torch.autograd.Function):
    """y[i, j] = x[i, j] * s[i]; the buggy backward reads x's storage as row-major."""

    @staticmethod
    def forward(ctx, x, s, assumes_contiguous):
        ctx.save_for_backward(x, s)
        ctx.assumes_contiguous = assumes_contiguous
        return x * s[:, None]

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        if ctx.assumes_contiguous:
            x = x.as_strided(x.shape, (x.shape[1], 1))
        return g * s[:, None], (g * x).sum(1), None


def _transposed(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(cols, rows, dtype=dtype, generator=torch.Generator().manual_seed(0)).T


@pytest.mark.parametrize("mode", ["full", "fast", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_backward_that_assumes_contiguous_memory_fails_on_a_transposed_input(mode, dtype):
    x = _transposed(5, 4, dtype)
    s = torch.linspace(0.5, 2.0, 5, dtype=dtype)
    assert not x.is_contiguous()
    assert not gc.check(lambda x, s: RowScale.apply(x, s, True), x, s, mode=mode, seed=1).ok
    assert gc.check(lambda x, s: RowScale.apply(x, s, False), x, s, mode=mode, seed=1).ok
    # the same code on a contiguous copy is right: the bug needs the layout
    assert gc.check(lambda x, s: RowScale.apply(x, s, True), x.contiguous(), s, mode=mode, seed=1).ok


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_fn_sees_the_strides_it_was_given_at_every_call(mode):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    seen = set()

    def fn(x):
        if not isinstance(x, torch.Tensor) or not torch._C._functorch.is_batchedtensor(x):
            seen.add(x.stride())
        return torch.tanh(x) * 2

    assert gc.check(fn, x, mode=mode).ok
    assert seen == {x.stride()}


def test_a_complex_transposed_input_keeps_its_layout():
    a = torch.randn(4, 3, dtype=torch.complex128).T
    seen = set()

    def fn(a):
        seen.add(a.stride())
        return a * a.conj() + a

    assert gc.check(fn, a).ok
    assert seen == {a.stride()}


def test_inputs_with_gaps_or_overlaps_still_check():
    """A slice with gaps and an expanded tensor have no dense layout to keep: fn gets them
    contiguous, and the verdicts stand."""
    base = torch.randn(6, 8, dtype=torch.float64)
    assert gc.check(torch.sin, base[:, ::2]).ok
    assert gc.check(lambda t: t.exp(), torch.randn(3, 1, dtype=torch.float64).expand(3, 4)).ok
