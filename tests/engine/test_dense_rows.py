"""Dense full mode: the row-by-row analytic Jacobian, its re-run, and the all-clear verdicts."""

from __future__ import annotations

import pytest
import torch
from planted import NoisyDenseBackward

import gradcheck_svc as gc
from gradcheck_svc.engine import full


def _dense(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5, torch.randn(
        n, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("n", [100, 600])
def test_a_nondeterministic_backward_is_caught_in_a_dense_jacobian(n):
    # 600 rows: the re-run covers the first batch of rows alone, which must still show it.
    w, x = _dense(n)
    report = gc.check(lambda x: NoisyDenseBackward.apply(x, w), x, mode="full")
    assert not report.ok
    (pair,) = report.pairs
    assert pair.status == gc.Status.NONDETERMINISTIC
    assert pair.nondeterminism is not None and pair.nondeterminism > 0


def test_the_rerun_batch_is_a_share_of_a_large_jacobian(monkeypatch):
    # The re-run repeats the first batch of rows: at most a sixteenth of a large Jacobian's rows
    # (and at least _RERUN_ROWS), whatever the memory allows per batch.
    w, x = _dense(4000 // 8)
    sizes: list[int] = []
    real = full._rerun_dense

    def spy(ctx, jac, chunk, selection, accumulators):
        sizes.append(chunk.numel())
        return real(ctx, jac, chunk, selection, accumulators)

    monkeypatch.setattr(full, "_rerun_dense", spy)
    assert gc.check(lambda x: torch.tanh(w @ x), x, mode="full").ok
    assert sizes == [full._RERUN_ROWS]


def test_every_clear_pass_of_an_all_zero_block_reads_a_zero_ratio():
    # f = 0 * (W x): every block is exactly zero, so no tolerance has a floor; 0 / 0 reads 0.
    w, x = _dense(300)
    report = gc.check(lambda x: (w @ x) * 0, x, mode="full")
    assert report.ok
    (pair,) = report.pairs
    assert pair.max_error_ratio == 0.0 and pair.max_abs_error == 0.0 and pair.max_rel_error == 0.0


def test_relative_error_leaves_out_zero_numeric_values():
    # Half the outputs do not depend on x (numeric exactly 0) while the backward claims a small
    # slope there: their relative error is undefined and left out; the others' is finite.
    w, x = _dense(300)

    class HalfWrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(w @ x)
            ctx.save_for_backward(y)
            return torch.cat([y[:150], torch.zeros(150, dtype=y.dtype)])

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return (g[:150] * (1 - y[:150] ** 2)) @ w[:150] + 1e-3 * g[150:].sum()

    report = gc.check(HalfWrong.apply, x, mode="full")
    assert not report.ok
    (pair,) = report.pairs
    assert 0.0 < pair.max_rel_error < float("inf")
    assert pair.max_abs_error == pytest.approx(1e-3, rel=1e-6)
    assert all(e.numeric == 0.0 and e.analytic == pytest.approx(1e-3) for e in pair.worst)
