"""Full mode: every Jacobian element, streamed over column chunks.

The numeric side perturbs a chunk of columns of one leaf in one batched call.
The analytic side is a dense reverse-mode Jacobian when it fits in memory
(one vjp per output element, batched), otherwise the same columns computed by
differentiating the backward (vjp of the vjp), so memory stays bounded by the
chunk whatever the size of the Jacobian.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from gradcheck_svc.engine.compare import PairAccumulator, judge
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.numeric import Differences, differences, perturb, steps
from gradcheck_svc.report import Check

__all__ = ["DENSE_ENTRIES", "run_full"]

DENSE_ENTRIES = 1 << 25  # analytic Jacobians up to this many entries are held densely (256 MiB)
_ROW_BYTES = 128 * 2**20

Pair = tuple[int, int]  # (output block index, leaf index)


def _row_chunks(ctx: Context, outputs: list[int], leaves: list[int]) -> list[torch.Tensor]:
    """The selected outputs' rows, in batches sized to memory."""
    problem = ctx.problem
    m = problem.n_outputs
    rows = torch.cat([torch.arange(problem.outputs[o].offset, problem.outputs[o].rows.stop) for o in outputs])
    n_total = sum(problem.leaves[i].size for i in leaves)
    per_chunk = max(1, min(rows.numel(), _ROW_BYTES // max(1, 8 * (n_total + m))))
    return [rows[start : start + per_chunk].to(ctx.f0.device) for start in range(0, rows.numel(), per_chunk)]


def _unit_cotangents(rows: torch.Tensor, m: int) -> torch.Tensor:
    cotangents = torch.zeros(rows.numel(), m, dtype=torch.float64, device=rows.device)
    cotangents[torch.arange(rows.numel(), device=rows.device), rows] = 1.0
    return cotangents


def _dense_rows(ctx: Context, chunks: list[torch.Tensor], leaves: list[int]) -> dict[int, torch.Tensor]:
    """Reverse-mode Jacobian of the chunks' rows, per selected leaf, transposed: (n_i, M) each.

    Transposed so that a chunk of input columns is a contiguous (c, M) slice, the layout the
    numeric side produces.
    """
    problem = ctx.problem
    m = problem.n_outputs
    jac = {
        i: torch.zeros(problem.leaves[i].size, m, dtype=torch.float64, device=ctx.f0.device) for i in leaves
    }
    for chunk in chunks:
        ctx.poll()
        grads = ctx.analytic.rows(_unit_cotangents(chunk, m))
        for i in leaves:
            jac[i][:, chunk] = grads[i].T
    return jac


def _nondeterminism(ctx: Context, jac: dict[int, torch.Tensor], chunk: torch.Tensor) -> dict[int, float]:
    """Run the first batch of the backward again, exactly as before, and compare per leaf.

    The very same batch: a batch of another size may round differently (other GEMM blocking),
    which is not nondeterminism.
    """
    again = ctx.analytic.rows(_unit_cotangents(chunk, ctx.problem.n_outputs))
    result = {}
    for i, first in jac.items():
        before = first[:, chunk].T
        same = (again[i] == before) | (again[i].isnan() & before.isnan())  # NaN twice is no change
        delta = (again[i] - before).abs().nan_to_num(nan=float("inf")).masked_fill_(same, 0.0)
        result[i] = float(delta.max()) if delta.numel() else 0.0
    return result


def run_full(
    ctx: Context,
    pairs: Iterable[Pair] | None = None,
    *,
    mode_label: str = "full",
) -> dict[tuple[Check, int, int], PairAccumulator]:
    """Check the selected pairs (default: all) element by element."""
    problem = ctx.problem
    options = ctx.options
    selected = (
        set(pairs)
        if pairs is not None
        else {(o, i) for o in range(len(problem.outputs)) for i in range(len(problem.leaves))}
    )
    outputs = sorted({o for o, _ in selected})
    leaves = sorted({i for _, i in selected})
    m = problem.n_outputs
    n_sel = sum(problem.leaves[i].size for i in leaves)
    ctx.check_limits(m * n_sel, 3 * n_sel)
    dense = m * n_sel <= DENSE_ENTRIES

    accumulators: dict[tuple[Check, int, int], PairAccumulator] = {}

    def acc(check: Check, o: int, i: int) -> PairAccumulator:
        key = (check, o, i)
        if key not in accumulators:
            accumulators[key] = PairAccumulator(
                problem.outputs[o], problem.leaves[i], check, mode_label, options.max_worst
            )
        return accumulators[key]

    jac: dict[int, torch.Tensor] = {}
    if dense:
        start = time.perf_counter()
        chunks = _row_chunks(ctx, outputs, leaves)
        jac = _dense_rows(ctx, chunks, leaves)
        if options.check_nondeterminism and chunks:
            # The backward is shared by every output: its second run speaks for all pairs.
            for i, delta in _nondeterminism(ctx, jac, chunks[0]).items():
                for o in outputs:
                    if (o, i) in selected:
                        acc(Check.REVERSE, o, i).record_nondeterminism(delta, options.nondet_tol)
        ctx.timed("analytic_s", start)

    machine_eps = ctx.machine_eps
    for i in leaves:
        leaf = problem.leaves[i]
        base = leaf.real
        h_all = steps(base, ctx.eps(leaf))
        size = ctx.chunk_size(leaf)
        leaf_outputs = [o for o in outputs if (o, i) in selected]
        positions = leaf.finite_positions()  # +-inf and NaN elements have no finite step
        for start_col in range(0, positions.numel(), size):
            ctx.poll()
            cols = positions[start_col : start_col + size]
            t0 = time.perf_counter()
            batch, offsets = perturb(base, cols, h_all[cols])
            evaluated = ctx.evaluate(i, batch)
            ctx.timed("numeric_s", t0)

            t0 = time.perf_counter()
            # Analytic columns as (c, M), the numeric side's layout.
            if dense:
                analytic_t = jac[i][cols]
            else:
                onehot = _onehot(cols, leaf.size, base)
                analytic_t = ctx.analytic.columns(i, onehot)
                if options.check_nondeterminism and start_col == 0:
                    again = ctx.analytic.columns(i, onehot)
                    for o in leaf_outputs:
                        rows = problem.outputs[o].rows
                        second, first = again[:, rows], analytic_t[:, rows]
                        delta = (second - first).abs().nan_to_num(nan=float("inf"))
                        delta.masked_fill_((second == first) | (second.isnan() & first.isnan()), 0.0)
                        worst = float(delta.max()) if delta.numel() else 0.0
                        acc(Check.REVERSE, o, i).record_nondeterminism(worst, options.nondet_tol)
            forward_t = (
                ctx.analytic.jvp_columns(i, _onehot(cols, leaf.size, base)) if options.forward_ad else None
            )
            ctx.timed("analytic_s", t0)

            # Rows that no perturbation moved and whose analytic entries are all zero agree
            # trivially (0 == 0): only the active rows are differenced and judged. For
            # elementwise or banded functions that is a tiny fraction of the block.
            t0 = time.perf_counter()
            active = (evaluated != ctx.f0).any(dim=0) | (analytic_t != 0).any(dim=0) | ~torch.isfinite(ctx.f0)
            if forward_t is not None:
                active |= (forward_t != 0).any(dim=0)
            active_rows = active.nonzero().squeeze(1)
            all_active = active_rows.numel() == m
            diff = differences(
                evaluated if all_active else evaluated[:, active_rows],
                ctx.f0 if all_active else ctx.f0[active_rows],
                offsets,
                machine_eps,
                torch.maximum(base[cols].detach().abs().to(torch.float64), h_all[cols]),
            )
            analytic = (analytic_t if all_active else analytic_t[:, active_rows]).T
            forward = None
            if forward_t is not None:
                forward = (forward_t if all_active else forward_t[:, active_rows]).T
            for o in leaf_outputs:
                block = problem.outputs[o]
                # Active rows are sorted, so each output's rows form one slice of them.
                lo = int(torch.searchsorted(active_rows, block.offset))
                hi = int(torch.searchsorted(active_rows, block.rows.stop))
                rows_in_block = active_rows[lo:hi] - block.offset
                tol = ctx.tolerance(block, leaf)
                d_o = diff.rows(slice(lo, hi))
                a_o = analytic[lo:hi]
                skipped = (block.size - (hi - lo)) * cols.numel()
                reverse = acc(Check.REVERSE, o, i)
                reverse.add(cols, a_o, d_o, judge(a_o, d_o, tol), rows=rows_in_block)
                reverse.checked += skipped
                if forward is not None:
                    f_o = forward[lo:hi]
                    fwd = acc(Check.FORWARD, o, i)
                    fwd.add(cols, f_o, d_o, judge(f_o, d_o, tol), rows=rows_in_block)
                    exact = _exact(a_o)
                    vs = acc(Check.FORWARD_VS_REVERSE, o, i)
                    vs.add(cols, f_o, exact, judge(f_o, exact, tol), rows=rows_in_block)
                    fwd.checked += skipped
                    vs.checked += skipped
            ctx.timed("compare_s", t0)
    return accumulators


def _onehot(cols: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    onehot = torch.zeros(cols.numel(), size, dtype=torch.float64, device=like.device)
    onehot[torch.arange(cols.numel(), device=like.device), cols] = 1.0
    return onehot


def _exact(values: torch.Tensor) -> Differences:
    """A reference with no error bar (reverse-mode values) in the shape ``judge`` expects."""
    zeros = torch.zeros_like(values)
    return Differences(values, zeros, values, values, zeros)
