"""Full mode: every Jacobian element, streamed over column chunks.

The numeric side perturbs a chunk of columns of one leaf in one batched call.
The analytic side is a dense reverse-mode Jacobian when it fits in memory
(one vjp per output element, batched), otherwise the same columns computed by
differentiating the backward (vjp of the vjp), so memory stays bounded by the
chunk whatever the size of the Jacobian.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from gradcheck_svc.engine.agreement import largest_change
from gradcheck_svc.engine.analytic import Analytic
from gradcheck_svc.engine.colouring import run_coloured
from gradcheck_svc.engine.compare import ClearTest, PairAccumulator, clear_passes, judge, merge_wide
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.far_left import far_left_of, ties_of
from gradcheck_svc.engine.linearity import RERUN_SCALE, separate, unscaled
from gradcheck_svc.engine.numeric import (
    DTYPE_DEFAULTS,
    NODES,
    Central,
    Differences,
    Probes,
    central,
    differences,
    node_offsets,
    noise_sample,
    perturb,
    probe_noise,
    row_noise,
    sampled_noise,
    steps,
)
from gradcheck_svc.engine.probes import onehot
from gradcheck_svc.engine.problem import OutputBlock
from gradcheck_svc.engine.structure import run_structured
from gradcheck_svc.report import Check

__all__ = ["DENSE_ENTRIES", "run_full"]

_ADAPTIVE_COLUMNS = 256  # column chunks from this size take the third node only where in doubt

DENSE_ENTRIES = 1 << 25  # analytic Jacobians up to this many entries are held densely (256 MiB)
_RERUN_ROWS = 256  # rows the nondeterminism re-run of the backward covers, at least (or all)
_RERUN_SHARE = 16  # ... or this fraction of the rows, when that is more

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
    if problem.n_outputs * n_sel <= DENSE_ENTRIES:
        # Block-structured Jacobians: a few compressed backward passes, verified by the groups.
        structured = run_structured(
            ctx,
            selection.pairs,
            lambda chosen, jac: _check_leaves(
                ctx,
                _Selection.of(len(problem.outputs), len(problem.leaves), chosen),
                jac,
                None,
                _Accumulators(ctx),
            ),
        )
        if structured is not None:
            return dict(structured)
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
    return _check_leaves(ctx, selection, jac, wide_jac, accumulators)


def _check_leaves(
    ctx: Context,
    selection: _Selection,
    jac: dict[int, torch.Tensor] | None,
    wide_jac: dict[int, torch.Tensor] | None,
    accumulators: _Accumulators,
) -> dict[tuple[Check, int, int], PairAccumulator]:
    """The numeric side and the verdict, leaf by leaf."""
    problem = ctx.problem
    for i in selection.leaves:
        positions = ctx.numeric_problem.leaves[i].finite_positions()  # +-inf and NaN have no step
        noise = _probe_noise(ctx, i, positions)
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
            left = run_coloured(ctx, i, jac[i], blocks, directions=noise)
            positions = positions if left is None else left
            ctx.timed("numeric_s", start)
        measured = _Measured()
        for chunk, cols in enumerate(_column_chunks(ctx, i, positions)):
            columns = _analytic_columns(ctx, i, cols, jac, wide_jac, selection, accumulators, chunk == 0)
            _judge_columns(ctx, i, cols, columns, selection, accumulators, noise, measured)
    return dict(accumulators)


def _probe_noise(ctx: Context, i: int, positions: torch.Tensor) -> Probes | None:
    """Where the differences stay in a low precision (fn does not run on float64 copies), every
    output's noise samples along a few random directions over leaf ``i`` (``probe_noise``).
    None in float64, whose rounding the column sample and the floor cover."""
    if ctx.numeric_machine_eps <= DTYPE_DEFAULTS[torch.float64].machine_eps or not positions.numel():
        return None
    start = time.perf_counter()
    base = ctx.numeric_problem.leaves[i].real
    generator = torch.Generator().manual_seed(ctx.options.seed + i)
    h = steps(base[positions], ctx.eps(ctx.numeric_problem.leaves[i]))
    samples = probe_noise(
        lambda batch: ctx.evaluate(i, batch, columns=0),
        base,
        positions,
        h,
        ctx.numeric_f0,
        ctx.numeric_machine_eps,
        generator,
    )
    ctx.timed("numeric_s", start)
    return samples


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
    rows = torch.cat(
        [torch.arange(problem.outputs[o].offset, problem.outputs[o].rows.stop) for o in selection.outputs]
    )
    n_total = sum(problem.leaves[i].size for i in selection.leaves)
    per_chunk = ctx.rows_per_backward(n_total, rows.numel())
    # The nondeterminism check runs the first batch again: on a large Jacobian, a first batch of
    # a fraction of the rows keeps that re-run from nearly doubling the analytic side.
    head = (
        per_chunk
        if rows.numel() <= _RERUN_ROWS
        else min(per_chunk, max(_RERUN_ROWS, rows.numel() // _RERUN_SHARE))
    )
    bounds = [0, *range(head, rows.numel(), per_chunk), rows.numel()]
    return [rows[a:b].to(ctx.f0.device) for a, b in itertools.pairwise(bounds)]


def _dense_rows(
    ctx: Context, analytic: Analytic, chunks: list[torch.Tensor], leaves: list[int]
) -> dict[int, torch.Tensor]:
    """Reverse-mode Jacobian of the chunks' rows, per selected leaf, transposed: (n_i, M) each.

    Transposed so that a chunk of input columns is a contiguous (c, M) slice, the layout the
    numeric side produces.
    """
    problem = ctx.problem
    m = problem.n_outputs
    # Rows of outputs left out of the selection stay zero; when the chunks cover every row, each
    # entry is written below and the fill would be one more pass over the largest tensor.
    covered = sum(chunk.numel() for chunk in chunks) == m
    make = torch.empty if covered else torch.zeros
    jac = {i: make(problem.leaves[i].size, m, dtype=torch.float64, device=ctx.f0.device) for i in leaves}
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
    """Run the first batch of the backward again, with cotangents twice as large (``linearity``),
    and compare per leaf.

    The very same batch: a batch of another size may round differently (other GEMM blocking),
    which is not nondeterminism. The backward is shared by every output: its second run speaks
    for all pairs.
    """
    cotangents = onehot(chunk, ctx.problem.n_outputs)

    def changes(scale: float) -> list[float]:
        again = ctx.analytic.rows(cotangents * scale)
        return [largest_change(first[:, chunk].T, unscaled(again[i], scale)) for i, first in jac.items()]

    largest = [_largest_magnitude(first[:, chunk]) for first in jac.values()]
    found = separate(changes(RERUN_SCALE), lambda: changes(1.0), ctx.options.nondet_tol, largest)
    for i, (delta, nonlinearity) in zip(jac, found, strict=True):
        for o in selection.outputs_of(i):
            accumulators.of(Check.REVERSE, o, i).record_rerun(delta, nonlinearity, ctx.options.nondet_tol)


def _largest_magnitude(values: torch.Tensor) -> float:
    """max |value| over the finite values, 0 for none."""
    finite = values[values.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


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
    if ctx.options.chunk_size is None:
        # The memory's limit spread evenly: a small last chunk would take the third node in every
        # column (under _ADAPTIVE_COLUMNS), the slow path, for no reason but the remainder.
        count = -(-positions.numel() // size)
        size = -(-positions.numel() // count) if count else size
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
    noise: Probes | None = None,
    measured: _Measured | None = None,
) -> None:
    """Finite differences of columns ``cols`` of leaf ``i``, judged against the analytic columns.

    A first pass evaluates ``x - h`` and ``x + h`` for every column (and ``x + 2h`` for the
    noise sample's). A column whose every element the central difference passes by a wide
    margin, with no sign of a kink, is reported with it; the others take the third node and
    are judged on the Richardson value and its bars, as every column once was. ``measured``
    holds the noise earlier chunks of the leaf sampled: an output's noise is its own, whichever
    columns move it, so a chunk whose outputs all have one takes no sample of its own.
    """
    numeric_leaf = ctx.numeric_problem.leaves[i]
    base = numeric_leaf.real
    device = base.device
    c = cols.numel()
    t0 = time.perf_counter()
    h = steps(base[cols], ctx.eps(numeric_leaf))
    offsets = node_offsets(base, cols, h)
    # Below a few hundred columns the noise sample takes every column (and under four, none at
    # all): every column then takes the third node in the first pass, with no test to pay for.
    three_nodes = c < _ADAPTIVE_COLUMNS
    sample = torch.arange(c, device=device) if three_nodes else noise_sample(c).to(device)
    # Later chunks of a leaf evaluate the sample's third node only if some output needs it.
    deferred = not three_nodes and measured is not None and measured.sigma is not None
    parts = [(NODES[0], cols, h), (NODES[1], cols, h)]
    if not deferred:
        parts.append((NODES[2], cols[sample], h[sample]))
    batch = perturb(base, parts)
    evaluated = ctx.evaluate(i, batch, columns=c)
    del batch
    ctx.timed("numeric_s", t0)

    # Rows that no perturbation moved and whose analytic entries are all zero agree trivially
    # (0 == 0): only the active rows are differenced and judged. For elementwise or banded
    # functions that is a tiny fraction of the block.
    t0 = time.perf_counter()
    f0 = ctx.numeric_f0
    active = (columns.reverse != 0).any(dim=0) | ~torch.isfinite(f0)
    for extra in (columns.forward, columns.wide):
        if extra is not None:
            active |= (extra != 0).any(dim=0)
    if not bool(active.all()):
        # The evaluated block is the largest of all: read only when some row is still idle
        # (a dense Jacobian's analytic columns mark every row already).
        active |= (evaluated != f0).any(dim=0)
    x_scale = torch.maximum(base[cols].detach().abs().to(torch.float64), h)
    rows = _Rows.of(active)

    def probed(rows: _Rows) -> Probes | None:
        """The probe directions' noise samples of ``rows``."""
        if noise is None:
            return None
        return noise if rows.every else noise.rows(rows.index)

    if three_nodes:
        diff = differences(
            rows.part(evaluated),
            rows.part(f0),
            offsets,
            ctx.numeric_machine_eps,
            x_scale,
            directions=probed(rows),
        )
        ctx.timed("compare_s", t0)
        _judge_blocks(ctx, i, cols, columns, selection, accumulators, rows, diff, None, h)
        return

    pair = evaluated[: 2 * c]
    plus2 = torch.empty(c, evaluated.shape[1], dtype=evaluated.dtype, device=device)  # x + 2h, where taken
    taken = torch.zeros(c, dtype=torch.bool, device=device)  # the columns whose x + 2h is in plus2
    if not deferred:
        plus2[sample] = evaluated[2 * c :]
        taken[sample] = True

    def first_pass(rows: _Rows) -> tuple[Central, torch.Tensor | None]:
        nonlocal t0
        median = None
        known = measured.of(rows.index) if measured is not None and deferred else None
        if known is not None:
            median = known
        elif sample.numel():
            missing = sample[~taken[sample]]
            if missing.numel():
                started = time.perf_counter()
                plus2[missing] = ctx.evaluate(
                    i, perturb(base, [(NODES[2], cols[missing], h[missing])]), columns=0
                )
                taken[missing] = True
                ctx.timed("numeric_s", started)
                t0 += time.perf_counter() - started
            nodes = torch.cat([pair[:c][sample], pair[c:][sample], plus2[sample]])
            median = sampled_noise(rows.part(nodes), rows.part(f0), offsets[:, sample], probed(rows))
            if measured is not None:
                measured.record(rows.index, median, f0.numel())
        eps = ctx.numeric_machine_eps
        return central(rows.part(pair), rows.part(f0), offsets, median, eps, x_scale), median

    first, median = first_pass(rows)
    tests = _clear_tests(ctx, i, columns, first, rows, selection)
    if tests:
        doubtful = ~torch.stack([t.clear.all(dim=0) for t in tests.values()]).all(dim=0)
    else:
        doubtful = torch.ones(c, dtype=torch.bool, device=device)
    third = (doubtful & ~taken).nonzero().squeeze(1)
    ctx.timed("compare_s", t0)
    if third.numel():
        t0 = time.perf_counter()
        plus2[third] = ctx.evaluate(i, perturb(base, [(NODES[2], cols[third], h[third])]), columns=0)
        ctx.timed("numeric_s", t0)
        moved = (plus2[third] != f0).any(dim=0)
        if bool((moved & ~active).any()):
            # Rows only the third node moved are judged too (their first pass reads 0 == 0).
            rows = _Rows.of(active | moved)
            first, median = first_pass(rows)
            tests = {}

    t0 = time.perf_counter()
    redo = doubtful.nonzero().squeeze(1)
    lean = not redo.numel() and columns.forward is None and columns.wide is None and bool(tests)
    diff = first.reported(writable=bool(redo.numel()))
    if redo.numel():

        def redo_noise(richardson: torch.Tensor) -> torch.Tensor:
            # The noise floor's terms as the three-node columns have always had them: |R| there.
            magnitude = first.magnitude.clone()
            magnitude[:, redo] = richardson
            return row_noise(median, rows.part(f0), magnitude, x_scale, ctx.numeric_machine_eps)

        nodes = torch.cat([pair[:c][redo], pair[c:][redo], plus2[redo]])
        full = differences(
            rows.part(nodes),
            rows.part(f0),
            offsets[:, redo],
            ctx.numeric_machine_eps,
            x_scale[redo],
            redo_noise,
        )
        # Every block is an (M, c) view of (c, M) memory: a column is a contiguous row there.
        for mine, theirs in zip(diff.parts(), full.parts(), strict=True):
            mine.T[redo] = theirs.T
    ctx.timed("compare_s", t0)
    _judge_blocks(ctx, i, cols, columns, selection, accumulators, rows, diff, tests if lean else None, h)


def _judge_blocks(
    ctx: Context,
    i: int,
    cols: torch.Tensor,
    columns: _Columns,
    selection: _Selection,
    accumulators: _Accumulators,
    rows: _Rows,
    diff: Differences,
    clear: dict[int, ClearTest] | None,
    h: torch.Tensor,
) -> None:
    """Judge the numeric block ``diff`` of columns ``cols`` (steps ``h``) against every analytic
    side, output by output. ``clear``: every element passed the first-pass test, whose verdicts
    stand."""
    problem = ctx.problem
    c = cols.numel()
    t0 = time.perf_counter()
    analytic = rows.part(columns.reverse).T
    forward = rows.part(columns.forward).T if columns.forward is not None else None
    wide = rows.part(columns.wide).T if columns.wide is not None else None
    leaf = problem.leaves[i]
    for o in selection.outputs_of(i):
        block = problem.outputs[o]
        lo, hi = rows.slice(block)
        rows_in_block = rows.index[lo:hi] - block.offset
        tol = ctx.tolerance(block, leaf)
        d_o = diff.rows(slice(lo, hi))
        a_o = analytic[lo:hi]
        skipped = (block.size - (hi - lo)) * c
        reverse = accumulators.of(Check.REVERSE, o, i)
        if clear is not None:
            # Every element passed clearly: the verdict the test already holds.
            reverse.add(cols, a_o, d_o, clear[o].verdict(), rows=rows_in_block)
            reverse.checked += skipped
            continue
        allowance = ctx.rounding_allowance(rows.index[lo:hi], d_o.value)
        left = far_left_of(ctx, i, cols, h, rows.index[lo:hi])
        tied = ties_of(ctx, i, cols, rows.index[lo:hi], columns.reverse)
        verdict = judge(a_o, d_o, tol, extra=allowance, elements=True, far_left=left, ties=tied)
        if wide is not None:
            w_o = wide[lo:hi]
            assert columns.wide is not None
            tied_wide = ties_of(ctx, i, cols, rows.index[lo:hi], columns.wide)
            wide_verdict = judge(
                w_o, d_o, ctx.wide_tolerance(block, leaf), elements=True, far_left=left, ties=tied_wide
            )
            shown, verdict, only_wide = merge_wide(a_o, verdict, w_o, wide_verdict)
            reverse.wide_only += int(only_wide.sum())
        else:
            shown = a_o
        reverse.add(cols, shown, d_o, verdict, rows=rows_in_block)
        reverse.checked += skipped
        if forward is not None:
            f_o = forward[lo:hi]
            fwd = accumulators.of(Check.FORWARD, o, i)
            fwd.add(cols, f_o, d_o, judge(f_o, d_o, tol, elements=True, far_left=left), rows=rows_in_block)
            exact = _exact(a_o)
            vs = accumulators.of(Check.FORWARD_VS_REVERSE, o, i)
            vs.add(cols, f_o, exact, judge(f_o, exact, tol), rows=rows_in_block)
            fwd.checked += skipped
            vs.checked += skipped
    ctx.timed("compare_s", t0)


@dataclass
class _Measured:
    """Each output's sampled noise median over the chunks of one leaf so far: 0 where none."""

    sigma: torch.Tensor | None = None

    def record(self, index: torch.Tensor, median: torch.Tensor, outputs: int) -> None:
        if self.sigma is None:
            self.sigma = torch.zeros(outputs, dtype=median.dtype, device=median.device)
        self.sigma[index] = torch.maximum(self.sigma[index], median)

    def of(self, index: torch.Tensor) -> torch.Tensor | None:
        """The medians of outputs ``index``, or None when some of them has none yet."""
        if self.sigma is None:
            return None
        known = self.sigma[index]
        return known if bool((known > 0).all()) else None


@dataclass
class _Rows:
    """The output rows a column chunk judges: all of them, or the sorted active ones."""

    index: torch.Tensor
    every: bool

    @classmethod
    def of(cls, active: torch.Tensor) -> _Rows:
        index = active.nonzero().squeeze(1)
        return cls(index, index.numel() == active.numel())

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """Those rows of ``t`` (last dimension)."""
        return t if self.every else t[..., self.index]

    def slice(self, block: OutputBlock) -> tuple[int, int]:
        """The slice of the judged rows that falls in output ``block``."""
        if self.every:
            return block.offset, block.rows.stop
        lo = int(torch.searchsorted(self.index, block.offset))
        return lo, int(torch.searchsorted(self.index, block.rows.stop))


def _clear_tests(
    ctx: Context, i: int, columns: _Columns, first: Central, rows: _Rows, selection: _Selection
) -> dict[int, ClearTest]:
    """The clear-pass test of each output's block, against every analytic side judged (reverse,
    forward, the float64 run of the backward), the reverse side's kept per output. Empty when
    the tolerance allows no such test: every column then takes the third node."""
    problem = ctx.problem
    leaf = problem.leaves[i]
    sides = [(columns.forward, ctx.tolerance), (columns.wide, ctx.wide_tolerance)]
    tests: dict[int, ClearTest] = {}
    for o in selection.outputs_of(i):
        block = problem.outputs[o]
        lo, hi = rows.slice(block)
        first_o = first.rows(slice(lo, hi))
        a_o = rows.part(columns.reverse).T[lo:hi]
        allowance = ctx.rounding_allowance(rows.index[lo:hi], first_o.value)
        test = clear_passes(a_o, first_o, ctx.tolerance(block, leaf), extra=allowance)
        if test is None:
            return {}
        for values, tolerance in sides:
            if values is not None:
                other = clear_passes(rows.part(values).T[lo:hi], first_o, tolerance(block, leaf))
                if other is None:
                    return {}
                test.clear &= other.clear
        tests[o] = test
    return tests


def _exact(values: torch.Tensor) -> Differences:
    """A reference with no error bar (reverse-mode values) in the shape ``judge`` expects."""
    zeros = torch.zeros_like(values)
    return Differences(values, zeros, values, values, zeros)
