"""Full mode: every Jacobian element, streamed over column chunks.

The numeric side perturbs a chunk of columns of one leaf in one batched call.
The analytic side is a dense reverse-mode Jacobian when it fits in memory
(one vjp per output element, batched), otherwise the same columns computed by
differentiating the backward (vjp of the vjp), so memory stays bounded by the
chunk whatever the size of the Jacobian.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from gradcheck_svc.engine.agreement import largest_change
from gradcheck_svc.engine.analytic import Analytic
from gradcheck_svc.engine.colouring import run_coloured
from gradcheck_svc.engine.compare import PairAccumulator, clear_passes, judge, merge_wide
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.guard import batch_bytes
from gradcheck_svc.engine.numeric import (
    NODES,
    Central,
    Differences,
    central,
    differences,
    node_offsets,
    noise_sample,
    perturb,
    sampled_noise,
    steps,
)
from gradcheck_svc.engine.probes import onehot
from gradcheck_svc.engine.problem import OutputBlock
from gradcheck_svc.report import Check

__all__ = ["DENSE_ENTRIES", "run_full"]

DENSE_ENTRIES = 1 << 25  # analytic Jacobians up to this many entries are held densely (256 MiB)
_ROW_BYTES = 128 * 2**20

Pair = tuple[int, int]  # (output block index, leaf index)


@dataclass
class _Selection:
    """The pairs a run checks, and the outputs and leaves they involve."""

    pairs: set[Pair]
    outputs: list[int]
    leaves: list[int]

    @classmethod
    def of(cls, problem_outputs: int, problem_leaves: int, pairs: Iterable[Pair] | None) -> _Selection:
        chosen = (
            set(pairs)
            if pairs is not None
            else {(o, i) for o in range(problem_outputs) for i in range(problem_leaves)}
        )
        return cls(chosen, sorted({o for o, _ in chosen}), sorted({i for _, i in chosen}))

    def outputs_of(self, leaf: int) -> list[int]:
        return [o for o in self.outputs if (o, leaf) in self.pairs]


class _Accumulators(dict[tuple[Check, int, int], PairAccumulator]):
    """One accumulator per (check, output, leaf), created on first use."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self._ctx = ctx

    def of(self, check: Check, o: int, i: int) -> PairAccumulator:
        key = (check, o, i)
        if key not in self:
            problem = self._ctx.problem
            self[key] = PairAccumulator(
                problem.outputs[o], problem.leaves[i], check, "full", self._ctx.options.max_worst
            )
        return self[key]


def run_full(
    ctx: Context, pairs: Iterable[Pair] | None = None
) -> dict[tuple[Check, int, int], PairAccumulator]:
    """Check the selected pairs (default: all) element by element.

    Three steps: the analytic Jacobian (dense rows when it fits, else columns chunk by chunk),
    the nondeterminism re-run of the backward, and per column chunk the finite differences and
    the verdict.
    """
    problem = ctx.problem
    selection = _Selection.of(len(problem.outputs), len(problem.leaves), pairs)
    n_sel = sum(problem.leaves[i].size for i in selection.leaves)
    ctx.check_limits(problem.n_outputs * n_sel, 3 * n_sel)
    accumulators = _Accumulators(ctx)
    jac: dict[int, torch.Tensor] | None = None
    wide_jac: dict[int, torch.Tensor] | None = None
    if problem.n_outputs * n_sel <= DENSE_ENTRIES:
        start = time.perf_counter()
        chunks = _row_chunks(ctx, selection)
        jac = _dense_rows(ctx, ctx.analytic, chunks, selection.leaves)
        if ctx.options.check_nondeterminism and chunks:
            _rerun_dense(ctx, jac, chunks[0], selection, accumulators)
        if ctx.wide_analytic is not None:
            wide_jac = _dense_rows(ctx, ctx.wide_analytic, chunks, selection.leaves)
        ctx.timed("analytic_s", start)
    for i in selection.leaves:
        positions = ctx.numeric_problem.leaves[i].finite_positions()  # +-inf and NaN have no step
        if jac is not None and _colourable(ctx, i, positions):
            # Columns that share no output row are perturbed together; what is left goes one by one.
            start = time.perf_counter()
            blocks = [
                (
                    problem.outputs[o].rows,
                    accumulators.of(Check.REVERSE, o, i),
                    ctx.tolerance(problem.outputs[o], problem.leaves[i]),
                )
                for o in selection.outputs_of(i)
            ]
            left = run_coloured(ctx, i, jac[i], blocks)
            positions = positions if left is None else left
            ctx.timed("numeric_s", start)
        for chunk, cols in enumerate(_column_chunks(ctx, i, positions)):
            columns = _analytic_columns(ctx, i, cols, jac, wide_jac, selection, accumulators, chunk == 0)
            _judge_columns(ctx, i, cols, columns, selection, accumulators)
    return dict(accumulators)


@dataclass
class _Columns:
    """Analytic Jacobian columns of one chunk, as (c, M): reverse mode, and optionally forward
    mode and the float64 run of the backward."""

    reverse: torch.Tensor
    forward: torch.Tensor | None
    wide: torch.Tensor | None


# ---------------------------------------------------------------------- analytic side
def _row_chunks(ctx: Context, selection: _Selection) -> list[torch.Tensor]:
    """The selected outputs' rows, in batches sized to memory."""
    problem = ctx.problem
    m = problem.n_outputs
    rows = torch.cat(
        [torch.arange(problem.outputs[o].offset, problem.outputs[o].rows.stop) for o in selection.outputs]
    )
    n_total = sum(problem.leaves[i].size for i in selection.leaves)
    per_row = max(1, 8 * (n_total + m), 3 * ctx.eval_bytes)  # a backward holds about 3 forward peaks
    per_chunk = max(1, min(rows.numel(), batch_bytes(_ROW_BYTES) // per_row))
    return [rows[start : start + per_chunk].to(ctx.f0.device) for start in range(0, rows.numel(), per_chunk)]


def _dense_rows(
    ctx: Context, analytic: Analytic, chunks: list[torch.Tensor], leaves: list[int]
) -> dict[int, torch.Tensor]:
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
        grads = analytic.rows(onehot(chunk, m))
        for i in leaves:
            jac[i][:, chunk] = grads[i].T
    return jac


def _rerun_dense(
    ctx: Context,
    jac: dict[int, torch.Tensor],
    chunk: torch.Tensor,
    selection: _Selection,
    accumulators: _Accumulators,
) -> None:
    """Run the first batch of the backward again, exactly as before, and compare per leaf.

    The very same batch: a batch of another size may round differently (other GEMM blocking),
    which is not nondeterminism. The backward is shared by every output: its second run speaks
    for all pairs.
    """
    again = ctx.analytic.rows(onehot(chunk, ctx.problem.n_outputs))
    for i, first in jac.items():
        delta = largest_change(first[:, chunk].T, again[i])
        for o in selection.outputs_of(i):
            accumulators.of(Check.REVERSE, o, i).record_nondeterminism(delta, ctx.options.nondet_tol)


def _analytic_columns(
    ctx: Context,
    i: int,
    cols: torch.Tensor,
    jac: dict[int, torch.Tensor] | None,
    wide_jac: dict[int, torch.Tensor] | None,
    selection: _Selection,
    accumulators: _Accumulators,
    first_chunk: bool,
) -> _Columns:
    """The analytic Jacobian columns ``cols`` of leaf ``i``: from the dense rows when they were
    taken, else from the backward itself (vjp of the vjp), with the nondeterminism re-run."""
    start = time.perf_counter()
    leaf = ctx.problem.leaves[i]
    wide: torch.Tensor | None = None
    if jac is not None:
        reverse = jac[i][cols]
        wide = wide_jac[i][cols] if wide_jac is not None else None
    else:
        directions = onehot(cols, leaf.size)
        reverse = ctx.analytic.columns(i, directions)
        if ctx.wide_analytic is not None:
            wide = ctx.wide_analytic.columns(i, directions)
        if ctx.options.check_nondeterminism and first_chunk:
            again = ctx.analytic.columns(i, directions)
            for o in selection.outputs_of(i):
                rows = ctx.problem.outputs[o].rows
                delta = largest_change(reverse[:, rows], again[:, rows])
                accumulators.of(Check.REVERSE, o, i).record_nondeterminism(delta, ctx.options.nondet_tol)
    forward = ctx.analytic.jvp_columns(i, onehot(cols, leaf.size)) if ctx.options.forward_ad else None
    ctx.timed("analytic_s", start)
    return _Columns(reverse, forward, wide)


# ---------------------------------------------------------------------- numeric side and verdict
def _colourable(ctx: Context, i: int, positions: torch.Tensor) -> bool:
    """Whether leaf ``i`` may be checked by column groups, with verdicts equal to the column path's.

    Groups judge the user's backward alone, with no float64 reference (no rounding allowance, no
    float64 run of the backward) and no forward mode; and every element of the leaf gets a step.
    Anything else goes column by column.
    """
    return (
        ctx.wide_analytic is None
        and not ctx.options.forward_ad
        and positions.numel() == ctx.numeric_problem.leaves[i].size
        and positions.numel() > 0
    )


def _column_chunks(ctx: Context, i: int, positions: torch.Tensor) -> Iterator[torch.Tensor]:
    leaf = ctx.numeric_problem.leaves[i]
    size = ctx.chunk_size(leaf)
    for start in range(0, positions.numel(), size):
        ctx.poll()
        yield positions[start : start + size]


def _judge_columns(
    ctx: Context,
    i: int,
    cols: torch.Tensor,
    columns: _Columns,
    selection: _Selection,
    accumulators: _Accumulators,
) -> None:
    """Finite differences of columns ``cols`` of leaf ``i``, judged against the analytic columns.

    A first pass evaluates ``x - h`` and ``x + h`` for every column (and ``x + 2h`` for the
    noise sample's). A column whose every element the central difference passes by a wide
    margin, with no sign of a kink, is reported with it; the others take the third node and
    are judged on the Richardson value and its bars.
    """
    problem = ctx.problem
    numeric_leaf = ctx.numeric_problem.leaves[i]
    base = numeric_leaf.real
    device = base.device
    c = cols.numel()
    t0 = time.perf_counter()
    h = steps(base[cols], ctx.eps(numeric_leaf))
    offsets = node_offsets(base, cols, h)
    sample = noise_sample(c).to(device)
    batch = perturb(base, [(NODES[0], cols, h), (NODES[1], cols, h), (NODES[2], cols[sample], h[sample])])
    evaluated = ctx.evaluate(i, batch, columns=c)
    del batch
    ctx.timed("numeric_s", t0)

    # Rows that no perturbation moved and whose analytic entries are all zero agree trivially
    # (0 == 0): only the active rows are differenced and judged. For elementwise or banded
    # functions that is a tiny fraction of the block.
    t0 = time.perf_counter()
    f0 = ctx.numeric_f0
    active = (evaluated != f0).any(dim=0) | (columns.reverse != 0).any(dim=0) | ~torch.isfinite(f0)
    for extra in (columns.forward, columns.wide):
        if extra is not None:
            active |= (extra != 0).any(dim=0)
    # x + 2h outputs, filled where evaluated: the sample now, the doubtful columns below.
    plus2 = torch.empty(c, evaluated.shape[1], dtype=evaluated.dtype, device=device)
    plus2[sample] = evaluated[2 * c :]
    pair = evaluated[: 2 * c]
    x_scale = torch.maximum(base[cols].detach().abs().to(torch.float64), h)

    def first_pass(rows: torch.Tensor | None) -> Central:
        part = (lambda t: t) if rows is None else (lambda t: t[:, rows])
        f0_part = f0 if rows is None else f0[rows]
        median = None
        if sample.numel():
            nodes = torch.cat([pair[:c][sample], pair[c:][sample], plus2[sample]])
            median = sampled_noise(part(nodes), f0_part, offsets[:, sample])
        return central(part(pair), f0_part, offsets, median, ctx.numeric_machine_eps, x_scale)

    active_rows = active.nonzero().squeeze(1)
    all_active = active_rows.numel() == problem.n_outputs
    first = first_pass(None if all_active else active_rows)
    doubtful = _doubtful_columns(ctx, i, columns, first, active_rows, all_active, selection)
    in_sample = torch.zeros(c, dtype=torch.bool, device=device)
    in_sample[sample] = True
    third = (doubtful & ~in_sample).nonzero().squeeze(1)
    ctx.timed("compare_s", t0)
    if third.numel():
        t0 = time.perf_counter()
        plus2[third] = ctx.evaluate(i, perturb(base, [(NODES[2], cols[third], h[third])]), columns=0)
        ctx.timed("numeric_s", t0)
        moved = (plus2[third] != f0).any(dim=0)
        if not all_active and bool((moved & ~active).any()):
            # Rows only the third node moved are judged too: their first pass reads 0 == 0.
            active_rows = (active | moved).nonzero().squeeze(1)
            all_active = active_rows.numel() == problem.n_outputs
            first = first_pass(None if all_active else active_rows)

    t0 = time.perf_counter()

    def active_part(t: torch.Tensor) -> torch.Tensor:
        return t if all_active else t[:, active_rows]

    diff = first.reported
    redo = doubtful.nonzero().squeeze(1)
    if redo.numel():
        nodes = torch.cat([pair[:c][redo], pair[c:][redo], plus2[redo]])
        full = differences(
            active_part(nodes),
            f0 if all_active else f0[active_rows],
            offsets[:, redo],
            ctx.numeric_machine_eps,
            x_scale[redo],
            sigma=first.sigma,
        )
        # Every block is an (M, c) view of (c, M) memory: a column is a contiguous row there.
        for mine, theirs in zip(_parts(diff), _parts(full), strict=True):
            mine.T[redo] = theirs.T
    analytic = active_part(columns.reverse).T
    forward = active_part(columns.forward).T if columns.forward is not None else None
    wide = active_part(columns.wide).T if columns.wide is not None else None
    leaf = problem.leaves[i]
    for o in selection.outputs_of(i):
        block = problem.outputs[o]
        lo, hi = _block_slice(active_rows, block, all_active)
        rows_in_block = active_rows[lo:hi] - block.offset
        tol = ctx.tolerance(block, leaf)
        d_o = diff.rows(slice(lo, hi))
        a_o = analytic[lo:hi]
        skipped = (block.size - (hi - lo)) * c
        reverse = accumulators.of(Check.REVERSE, o, i)
        allowance = ctx.rounding_allowance(active_rows[lo:hi], d_o.value)
        verdict = judge(a_o, d_o, tol, extra=allowance)
        if wide is not None:
            w_o = wide[lo:hi]
            wide_verdict = judge(w_o, d_o, ctx.wide_tolerance(block, leaf))
            shown, verdict, only_wide = merge_wide(a_o, verdict, w_o, wide_verdict)
            reverse.wide_only += int(only_wide.sum())
        else:
            shown = a_o
        reverse.add(cols, shown, d_o, verdict, rows=rows_in_block)
        reverse.checked += skipped
        if forward is not None:
            f_o = forward[lo:hi]
            fwd = accumulators.of(Check.FORWARD, o, i)
            fwd.add(cols, f_o, d_o, judge(f_o, d_o, tol), rows=rows_in_block)
            exact = _exact(a_o)
            vs = accumulators.of(Check.FORWARD_VS_REVERSE, o, i)
            vs.add(cols, f_o, exact, judge(f_o, exact, tol), rows=rows_in_block)
            fwd.checked += skipped
            vs.checked += skipped
    ctx.timed("compare_s", t0)


def _block_slice(active_rows: torch.Tensor, block: OutputBlock, all_active: bool) -> tuple[int, int]:
    """The slice of the (sorted) active rows that falls in output ``block``."""
    if all_active:
        return block.offset, block.rows.stop
    lo = int(torch.searchsorted(active_rows, block.offset))
    return lo, int(torch.searchsorted(active_rows, block.rows.stop))


def _doubtful_columns(
    ctx: Context,
    i: int,
    columns: _Columns,
    first: Central,
    active_rows: torch.Tensor,
    all_active: bool,
    selection: _Selection,
) -> torch.Tensor:
    """Columns some element of which the first pass does not clearly pass, against every
    analytic side judged (reverse, forward, the float64 run of the backward): ``(c,)`` bool."""
    problem = ctx.problem
    leaf = problem.leaves[i]
    clear = first.smooth.clone()
    sides = [(columns.reverse, ctx.tolerance, True)]
    if columns.forward is not None:
        sides.append((columns.forward, ctx.tolerance, False))
    if columns.wide is not None:
        sides.append((columns.wide, ctx.wide_tolerance, False))
    for o in selection.outputs_of(i):
        block = problem.outputs[o]
        lo, hi = _block_slice(active_rows, block, all_active)
        check = first.check.rows(slice(lo, hi))
        for values, tolerance, rounding in sides:
            a_o = (values if all_active else values[:, active_rows]).T[lo:hi]
            allowance = ctx.rounding_allowance(active_rows[lo:hi], check.value) if rounding else None
            passed = clear_passes(a_o, check, tolerance(block, leaf), extra=allowance)
            if passed is None:
                return torch.ones(first.smooth.shape[1], dtype=torch.bool, device=clear.device)
            clear[lo:hi] &= passed
    return ~clear.all(dim=0)


def _parts(d: Differences) -> tuple[torch.Tensor, ...]:
    return (d.value, d.bar, d.forward, d.backward, d.one_sided_bar)


def _exact(values: torch.Tensor) -> Differences:
    """A reference with no error bar (reverse-mode values) in the shape ``judge`` expects."""
    zeros = torch.zeros_like(values)
    return Differences(values, zeros, values, values, zeros)
