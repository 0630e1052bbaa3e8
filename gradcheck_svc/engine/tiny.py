"""Full mode for tiny problems: the judging arithmetic on Python floats.

A check of a few dozen Jacobian elements costs what its torch ops cost to dispatch, not what
they compute: differences, error bars, noise, the kink test, tolerances and the report take a
few hundred ops on tensors of a handful of numbers. Here the backward and the evaluations are
the column path's own calls (``Context.evaluate``, ``Analytic.rows``), their values come to
Python once, and every element is judged with the formulas of ``numeric.differences`` and
``compare.judge``, written out per element in the same order of operations, into the report
``PairAccumulator`` would build. Tests hold the reports to the column path's on random small
problems (kinks, non-finite values, nondeterminism, wrong backwards).

Only the column path is mirrored: a problem that the block-structure or colouring paths could
take, or that needs forward mode or chunks, goes to ``full.run_full``. A low-precision problem
with a float64 reference is mirrored too: the user's backward judged with the forward's rounding
allowance, its float64 run with the unit roundoff, the two verdicts merged (``compare.merge_wide``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import torch

from gradcheck_svc.engine import structure
from gradcheck_svc.engine.agreement import largest_change
from gradcheck_svc.engine.analytic import Analytic
from gradcheck_svc.engine.colouring import _MIN_GAIN  # a leaf is left alone when a row has more non-zeros
from gradcheck_svc.engine.compare import (
    _FAILED,
    _KINK,
    _KINK_BARS,
    _MAX_TIE_ELEMENTS,
    _PASSED,
    Ties,
    Tolerance,
    pair_fields,
    pair_status,
    reported_worst,
    wide_only_message,
)
from gradcheck_svc.engine.context import _FORWARD_ROUNDING, Context
from gradcheck_svc.engine.linearity import RERUN_SCALE, nonlinear_message, separate, unscaled
from gradcheck_svc.engine.numeric import _FLOOR_ULPS, _MIN_NOISE_SAMPLES, NODES, derivative_weights
from gradcheck_svc.engine.problem import Leaf, OutputBlock, flat_index
from gradcheck_svc.engine.ties import TieTest
from gradcheck_svc.report import Check, ElementError, PairReport

__all__ = [
    "ENABLED",
    "TINY_COLUMNS",
    "TINY_ENTRIES",
    "FloatDifferences",
    "FloatVerdict",
    "differences_on_floats",
    "judge_floats",
    "run_tiny",
]

ENABLED = True  # off: tiny checks take the column path (tests compare the two)

TINY_COLUMNS = 64  # input elements in all, at most
# Jacobian entries in all, at most: the float arithmetic costs some microseconds per entry, the
# tensor path's few hundred ops a fixed millisecond or two.
TINY_ENTRIES = 128


def _applies(ctx: Context) -> bool:
    """Whether the check is one the column path alone would answer, and tiny."""
    problem, o = ctx.problem, ctx.options
    if not ENABLED or o.forward_ad:
        return False
    n, m = problem.n_inputs, problem.n_outputs
    if n > TINY_COLUMNS or n * m > TINY_ENTRIES or m == 0:
        return False
    numeric = ctx.numeric_problem
    wide = ctx.wide_analytic is not None
    if numeric is not problem and not (wide and ctx.forward_rounding is not None):
        return False
    # The numeric side in float64 throughout: a perturbed value is then the float64 sum, as Python
    # computes it. A low-precision problem with a float64 reference is judged against that.
    if any(leaf.dtype != torch.float64 or leaf.size == 0 for leaf in numeric.leaves):
        return False
    if any(b.dtype != torch.float64 for b in numeric.outputs):
        return False
    if o.chunk_size is not None and o.chunk_size < max(leaf.size for leaf in problem.leaves):
        return False
    # The structure path gives up at once when some pair has no hypothesis (its shapes allow none),
    # or when there is a float64 run of the backward to judge.
    if (
        not wide
        and structure.ENABLED
        and all(structure.candidates(b.shape, leaf.shape) for b in problem.outputs for leaf in problem.leaves)
    ):
        return False
    return all(leaf.all_finite for leaf in numeric.leaves)


def _colouring_declines(jac_t: list[list[float]], size: int, f0_finite: bool) -> bool:
    """``colouring.run_coloured`` returns at once: f(x) not finite, or a row with more
    non-zeros (NaN counts as one) than colouring the leaf would pay for."""
    if not f0_finite:
        return True
    widest = max(sum(1 for column in jac_t if column[r] != 0) for r in range(len(jac_t[0])))
    return widest > size // _MIN_GAIN


def run_tiny(ctx: Context) -> list[PairReport] | None:
    """Every pair of a tiny problem, as ``full.run_full`` reports it; None where it does not apply."""
    if not _applies(ctx):
        return None
    problem, options = ctx.problem, ctx.options
    m, n = problem.n_outputs, problem.n_inputs
    ctx.check_limits(m * n, 3 * n)
    start = time.perf_counter()
    if ctx.rows_per_backward(n, m) < m:
        return None
    ctx.poll()
    jac_t = _transposed_jacobian(ctx.analytic, m, ctx.f0.device)  # per leaf, (n_i, M)
    f0 = ctx.numeric_f0.tolist()
    f0_finite = all(math.isfinite(v) for v in f0)
    # Columns are grouped only where the user's backward is judged alone (``full._colourable``).
    if ctx.wide_analytic is None and not all(
        _colouring_declines(j, leaf.size, f0_finite) for j, leaf in zip(jac_t, problem.leaves, strict=True)
    ):
        return None
    reruns: list[tuple[float | None, float | None]] = [(None, None)] * len(problem.leaves)
    if options.check_nondeterminism:

        def changes(scale: float) -> list[float]:
            again = _transposed_jacobian(ctx.analytic, m, ctx.f0.device, scale)
            return [_largest_change(j, a) for j, a in zip(jac_t, again, strict=True)]

        largest = [
            max((abs(v) for column in j for v in column if math.isfinite(v)), default=0.0) for j in jac_t
        ]
        reruns = list(separate(changes(RERUN_SCALE), lambda: changes(1.0), options.nondet_tol, largest))
    wide_t = (
        _transposed_jacobian(ctx.wide_analytic, m, ctx.f0.device) if ctx.wide_analytic is not None else None
    )
    rounding = ctx.forward_rounding.tolist() if ctx.forward_rounding is not None else None
    ctx.timed("analytic_s", start)

    reports: list[PairReport] = []
    for i, leaf in enumerate(problem.leaves):
        ctx.poll()
        columns, evaluated, offsets, x_scale = _evaluate_leaf(ctx, i)
        start = time.perf_counter()
        sides = [jac_t[i]] if wide_t is None else [jac_t[i], wide_t[i]]
        active = [
            any(row[r] != f0[r] for row in evaluated)
            or any(column[r] != 0 for side in sides for column in side)
            or not math.isfinite(f0[r])
            for r in range(m)
        ]
        rows = [r for r in range(m) if active[r]]
        diff = differences_on_floats(evaluated, f0, offsets, ctx.numeric_machine_eps, x_scale, rows)
        far_left = _FarLeft(ctx, i, f0)
        for block in problem.outputs:
            mine = [k for k, r in enumerate(rows) if block.offset <= r < block.offset + block.size]
            pair = _Pair(block, leaf, options.max_worst)
            block_diff = _rows_of(diff, mine)
            analytic = [[jac_t[i][j][rows[k]] for j in range(columns)] for k in mine]
            extra = None
            if rounding is not None:
                extra = [
                    [_FORWARD_ROUNDING * rounding[rows[k]] * abs(n) for n in row]
                    for k, row in zip(mine, block_diff.value, strict=True)
                ]
            judged_rows = [rows[k] for k in mine]
            left = far_left.of(judged_rows)
            verdicts = judge_floats(
                analytic,
                block_diff,
                ctx.tolerance(block, leaf),
                extra=extra,
                elements=True,
                far_left=left,
                ties=_ties(ctx, i, jac_t[i], judged_rows),
            )
            if wide_t is not None:
                wide = [[wide_t[i][j][rows[k]] for j in range(columns)] for k in mine]
                wide_verdicts = judge_floats(
                    wide,
                    block_diff,
                    ctx.wide_tolerance(block, leaf),
                    elements=True,
                    far_left=left,
                    ties=_ties(ctx, i, wide_t[i], judged_rows),
                )
                analytic, pair.wide_only = merge_wide_floats(analytic, verdicts, wide, wide_verdicts)
            pair.add(columns, [rows[k] - block.offset for k in mine], analytic, block_diff, verdicts)
            pair.checked += (block.size - len(mine)) * columns
            reports.append(pair.report(*reruns[i], options.nondet_tol))
        ctx.timed("compare_s", start)
    return reports


def _transposed_jacobian(
    analytic: Analytic, m: int, device: torch.device, scale: float = 1.0
) -> list[list[list[float]]]:
    """The backward of every output row (``probes.onehot`` of each), ``(n_i, M)`` lists per leaf;
    ``scale`` (a power of two) multiplies the cotangents and divides the results."""
    few = analytic.few_rows(m, scale)
    if few is not None:
        return few
    cotangents = torch.eye(m, dtype=torch.float64, device=device)
    if scale != 1.0:
        return [unscaled(g, scale).T.tolist() for g in analytic.rows(cotangents * scale)]
    return [g.T.tolist() for g in analytic.rows(cotangents)]


def _largest_change(first: list[list[float]], again: list[list[float]]) -> float:
    """``agreement.largest_change`` of two backward runs, on their lists."""
    if first == again:  # equal lists hold no NaN (NaN never compares equal)
        return 0.0
    return largest_change(torch.tensor(first, dtype=torch.float64), torch.tensor(again, dtype=torch.float64))


def _evaluate_leaf(ctx: Context, i: int) -> tuple[int, list[list[float]], list[list[float]], list[float]]:
    """The column path's perturbations of leaf ``i`` (every column at ``NODES``), evaluated.

    Steps, offsets and perturbed copies as ``numeric.steps``, ``node_offsets`` and ``perturb``
    make them, on floats: in float64 ``x + node * h`` rounds once either way.
    """
    leaf = ctx.numeric_problem.leaves[i]
    start = time.perf_counter()
    eps = ctx.eps(leaf)
    x = leaf.real.tolist()
    c = len(x)
    h = [2.0 ** round(math.log2(max(abs(v), 1.0) * eps)) for v in x]
    offsets = [[(x[j] + node * h[j]) - x[j] for j in range(c)] for node in NODES]
    rows = []
    for node in NODES:
        for j in range(c):
            row = list(x)
            row[j] = x[j] + node * h[j]
            rows.append(row)
    evaluated = ctx.evaluate_values(i, rows, columns=c)
    if evaluated is None:
        batch = torch.tensor(rows, dtype=torch.float64, device=leaf.real.device)
        evaluated = ctx.evaluate(i, batch, columns=c).tolist()
    ctx.timed("numeric_s", start)
    x_scale = [max(abs(v), step) for v, step in zip(x, h, strict=True)]
    return c, evaluated, offsets, x_scale


class _FarLeft:
    """``far_left.far_left_of`` on floats: ``D-(2h)`` of the columns of leaf ``i`` a verdict asks
    for, each evaluated once (``x - 2h``, as ``numeric.backward_2h``)."""

    def __init__(self, ctx: Context, i: int, f0: list[float]) -> None:
        self.ctx, self.i, self.f0 = ctx, i, f0
        self.known: dict[int, list[float]] = {}

    def of(self, rows: list[int]) -> Callable[[int, int], float]:
        """For a block whose judged rows are output rows ``rows``: ``(k, j) -> D-(2h)``."""

        def far_left(k: int, j: int) -> float:
            if j not in self.known:
                self.known[j] = self._column(j)
            return self.known[j][rows[k]]

        return far_left

    def _column(self, j: int) -> list[float]:
        leaf = self.ctx.numeric_problem.leaves[self.i]
        x = leaf.real.tolist()
        h = 2.0 ** round(math.log2(max(abs(x[j]), 1.0) * self.ctx.eps(leaf)))
        row = list(x)
        row[j] = x[j] - 2.0 * h
        offset = row[j] - x[j]
        values = self.ctx.evaluate_values(self.i, [row], columns=0)
        if values is None:
            batch = torch.tensor([row], dtype=torch.float64, device=leaf.real.device)
            values = self.ctx.evaluate(self.i, batch, columns=0).tolist()
        return [(f - v) / -offset for f, v in zip(self.f0, values[0], strict=True)]


def _ties(ctx: Context, i: int, jac_t: list[list[float]], rows: list[int]) -> Ties:
    """``far_left.ties_of`` on lists: the tie test of a block whose judged rows are output rows
    ``rows``, every column of leaf ``i`` with its transposed analytic Jacobian ``jac_t``."""
    test: TieTest | None = None

    def tied(k: int, j: int, error: float, tolerance: float) -> bool:
        nonlocal test
        if test is None:
            test = TieTest(ctx, i, lambda column, row: jac_t[column][row])
        return test.explains(j, rows[k], error, tolerance)

    return tied


class FloatDifferences:
    """Per judged row and column: R, its bar, D+, D- and the one-sided bar (``Differences``)."""

    def __init__(self, rows: int, c: int) -> None:
        self.value = [[0.0] * c for _ in range(rows)]
        self.bar = [[0.0] * c for _ in range(rows)]
        self.forward = [[0.0] * c for _ in range(rows)]
        self.backward = [[0.0] * c for _ in range(rows)]
        self.one_sided_bar = [[0.0] * c for _ in range(rows)]


def _rows_of(diff: FloatDifferences, mine: list[int]) -> FloatDifferences:
    if mine == list(range(len(diff.value))):
        return diff  # every judged row (one output block)
    part = FloatDifferences(0, 0)
    for name in ("value", "bar", "forward", "backward", "one_sided_bar"):
        setattr(part, name, [getattr(diff, name)[k] for k in mine])
    return part


def differences_on_floats(
    evaluated: list[list[float]],
    f0: list[float],
    offsets: list[list[float]],
    machine_eps: float,
    x_scale: list[float],
    rows: list[int],
) -> FloatDifferences:
    """``numeric.differences`` of the judged ``rows`` (noise from every column, as there) from
    outputs at the nodes (``3 * c`` lists, node-major) and offsets ``(3, c)``: ``(rows, c)`` lists."""
    c = len(x_scale)
    diff = FloatDifferences(len(rows), c)
    minus, plus, plus2 = evaluated[:c], evaluated[c : 2 * c], evaluated[2 * c :]
    weights, gains = [], []
    for j in range(c):
        t_m, t_p, t_p2 = offsets[0][j], offsets[1][j], offsets[2][j]
        w_m, w_p, w_p2 = derivative_weights(t_m, t_p, t_p2)
        weights.append((w_m, w_p, w_p2, 1.0 / (t_p - t_m)))
        total = w_m + w_p + w_p2
        gains.append(1.5 * math.sqrt(w_m * w_m + total * total + w_p * w_p + w_p2 * w_p2))
    truncation = [[0.0] * c for _ in rows]
    moved_count = [0] * len(rows)
    samples: list[list[float]] = [[] for _ in rows]
    for k, r in enumerate(rows):
        for j in range(c):
            t_m, t_p, t_p2 = offsets[0][j], offsets[1][j], offsets[2][j]
            w_m, w_p, w_p2, inv_span = weights[j]
            d_minus = f0[r] - minus[j][r]
            d_plus = plus[j][r] - f0[r]
            d_plus2 = plus2[j][r] - f0[r]
            diff.value[k][j] = d_plus * w_p + d_minus * -w_m + d_plus2 * w_p2
            trunc = abs(d_plus * (w_p - inv_span) + d_minus * (-w_m - inv_span) + d_plus2 * w_p2)
            truncation[k][j] = trunc
            forward = d_plus / t_p
            diff.forward[k][j] = forward
            diff.backward[k][j] = d_minus / -t_m
            diff.one_sided_bar[k][j] = abs(d_plus2 / t_p2 - forward)
            if d_plus != 0 or d_minus != 0 or d_plus2 != 0:
                moved_count[k] += 1
                sample = trunc * t_p
                if math.isfinite(sample):
                    samples[k].append(sample)
    side_gain = [1.5 * (2**0.5) / offsets[1][j] for j in range(c)]
    for k, r in enumerate(rows):
        median = 0.0
        if c >= _MIN_NOISE_SAMPLES and moved_count[k] >= _MIN_NOISE_SAMPLES and samples[k]:
            ordered = sorted(samples[k])
            median = ordered[(len(ordered) - 1) // 2] / 0.502  # torch's median: the lower middle
        terms = 0.0
        for j in range(c):
            terms += abs(diff.value[k][j]) * x_scale[j]
        if not math.isfinite(terms):
            terms = 0.0 if math.isnan(terms) or terms > 0 else terms
        scale = abs(f0[r])
        scale = 0.0 if math.isnan(scale) or math.isinf(scale) else scale
        floor = _FLOOR_ULPS * machine_eps * (scale + terms)
        sigma = max(median, floor) if c >= _MIN_NOISE_SAMPLES else floor
        for j in range(c):
            diff.bar[k][j] = truncation[k][j] + sigma * gains[j]
            diff.one_sided_bar[k][j] += sigma * side_gain[j]
    return diff


class FloatVerdict:
    """One element's judgement (``compare.Judgement``)."""

    __slots__ = ("error", "failed", "kink", "nonfinite", "ratio", "tolerance")

    def __init__(self, tolerance: float, error: float, ratio: float, failed: bool, kink: bool) -> None:
        self.tolerance, self.error, self.ratio = tolerance, error, ratio
        self.failed, self.kink, self.nonfinite = failed, kink, False


def _clean(value: float) -> float:
    return 0.0 if math.isnan(value) or math.isinf(value) else value


def _extra(value: float) -> float:
    """An extra tolerance as ``judge`` reads it: NaN and +inf count 0."""
    return 0.0 if math.isnan(value) or value == math.inf else value


def merge_wide_floats(
    analytic: list[list[float]],
    low: list[list[FloatVerdict]],
    wide_analytic: list[list[float]],
    wide: list[list[FloatVerdict]],
) -> tuple[list[list[float]], int]:
    """``compare.merge_wide`` on floats: ``low`` becomes the merged verdicts (in place); returns
    the analytic values to show and how many elements only the float64 run failed."""
    only_wide = [
        [w.failed and not v.failed for v, w in zip(rv, rw, strict=True)]
        for rv, rw in zip(low, wide, strict=True)
    ]
    count = sum(sum(row) for row in only_wide)
    shown = analytic
    if count:
        shown = [
            [w if o else a for a, w, o in zip(ra, rw, ro, strict=True)]
            for ra, rw, ro in zip(analytic, wide_analytic, only_wide, strict=True)
        ]
    for rv, rw, ro in zip(low, wide, only_wide, strict=True):
        for v, w, o in zip(rv, rw, ro, strict=True):
            if o:
                v.tolerance, v.error, v.ratio = w.tolerance, w.error, w.ratio
            v.failed = v.failed or w.failed
            v.nonfinite = v.nonfinite or w.nonfinite
            if count:  # merge_wide joins the kinks only where some element failed in float64 alone
                v.kink = v.kink or w.kink
    return shown, count


def judge_floats(
    analytic: list[list[float]],
    diff: FloatDifferences,
    tol: Tolerance,
    scale: list[list[float]] | None = None,
    extra: list[list[float]] | None = None,
    *,
    elements: bool = False,
    far_left: Callable[[int, int], float] | None = None,
    ties: Ties | None = None,
) -> list[list[FloatVerdict]]:
    """``compare.judge`` of a block, element by element (``scale``, ``extra``, ``elements``,
    ``far_left``: as there, the last one per element ``(k, j)``)."""
    finite = [
        [math.isfinite(a) and math.isfinite(n) for a, n in zip(ra, rn, strict=True)]
        for ra, rn in zip(analytic, diff.value, strict=True)
    ]
    every = all(all(row) for row in finite) and all(
        math.isfinite(v) for t in (diff.bar, diff.one_sided_bar) for row in t for v in row
    )

    def cleaned(k: int, j: int) -> tuple[float, float, float, float, float, float]:
        a, n = analytic[k][j], diff.value[k][j]
        fields = (n, diff.bar[k][j], diff.forward[k][j], diff.backward[k][j], diff.one_sided_bar[k][j])
        if not every:
            if not finite[k][j]:
                return (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            n, bar, forward, backward, side = (_clean(v) for v in fields)
            return (a, n, bar, forward, backward, side)
        return (a, *fields)

    values = [[cleaned(k, j) for j in range(len(row))] for k, row in enumerate(analytic)]
    atols: list[list[float]] | None = None
    if tol.atol is not None:
        atol = tol.atol + tol.slack
    elif scale is not None:
        atol = 0.0
        atols = [
            [
                tol.atol_factor * (scale[k][j] if every else _clean(scale[k][j]) if finite[k][j] else 0.0)
                + tol.slack
                for j in range(len(row))
            ]
            for k, row in enumerate(values)
        ]
    else:
        block = max((abs(v[1]) for row in values for v in row), default=0.0)
        atol = tol.atol_factor * block + tol.slack
    kink_bars = max(tol.bars, _KINK_BARS)
    verdicts = []
    for k, row in enumerate(values):
        out = []
        for j, (a, n, bar, fwd, bwd, side) in enumerate(row):
            if atols is not None:
                atol = atols[k][j]
            tolerance = abs(n) * tol.rtol + bar * tol.bars + atol
            if extra is not None:
                tolerance += _extra(extra[k][j]) if every or finite[k][j] else 0.0
            error = abs(a - n)
            # As compare.judge: a zero tolerance (atol = rtol = 0 asked for) makes any error infinite.
            ratio = 0.0 if error == 0 else error / tolerance if tolerance > 0 else math.inf
            failed = error > tolerance
            kink = False
            candidate = abs(fwd - bwd) > side * kink_bars * 2 + atol
            if candidate:
                margin = side * kink_bars + atol
                kink = min(fwd, bwd) - margin <= a <= max(fwd, bwd) + margin
                decided = elements and far_left is not None
                if decided and not kink:
                    assert far_left is not None
                    wide = margin + abs(far_left(k, j) - bwd) * kink_bars
                    kink = min(fwd, bwd) - wide <= a <= max(fwd, bwd) + wide
                # As compare.judge: with the node x - 2h, the interval alone decides an element.
                decisive = not kink if decided else (failed and not kink)
                failed = (failed or kink) if tol.kinks_fail else decisive
            if elements and failed and not kink:
                # ``compare._kinks_within_step``: a kink between x and x + 2h, told by the analytic
                # value sitting on the one-sided difference of its own piece (D+ held to its own
                # truncation, ``side``, as well).
                noise = max(bar - abs(n - (fwd + bwd) / 2), 0.0)
                margin = noise * _KINK_BARS + atol + tol.rtol * abs(a)
                plus_margin = margin + side
                spread = abs(fwd - bwd)
                on_plus = spread > 2 * plus_margin and abs(a - fwd) <= plus_margin
                if far_left is None:
                    on_minus = spread > 2 * margin and abs(a - bwd) <= margin
                else:  # compare._left_curvature
                    on_minus = False
                    if abs(a - bwd) <= abs(a - fwd) and spread > 2 * margin:
                        bwd_2h = far_left(k, j)
                        left = 2 * bwd - bwd_2h
                        kinked = abs((fwd + bwd) / 2 - left) > spread / 4
                        on_left = abs(a - bwd) <= margin or abs(a - left) <= margin + abs(bwd - bwd_2h) / 4
                        on_minus = kinked and on_left
                kink = on_minus or on_plus
                if not tol.kinks_fail:
                    failed = not kink
            verdict = FloatVerdict(tolerance, error, ratio, failed, kink)
            if not every and not finite[k][j]:
                a0, n0 = analytic[k][j], diff.value[k][j]
                same = (a0 == n0) or (math.isnan(a0) and math.isnan(n0))
                if math.isfinite(a0) or math.isfinite(n0) or not same:
                    verdict.ratio, verdict.failed, verdict.nonfinite = math.inf, True, True
            out.append(verdict)
        verdicts.append(out)
    if elements and ties is not None:
        # compare._tied: the few elements that still fail, asked in row-major order.
        at = [(k, j) for k, row in enumerate(verdicts) for j, v in enumerate(row) if v.failed and not v.kink]
        if 0 < len(at) <= _MAX_TIE_ELEMENTS:
            for k, j in at:
                v = verdicts[k][j]
                if ties(k, j, v.error, v.tolerance):
                    v.kink, v.failed = True, tol.kinks_fail
    return verdicts


def _top(key: list[float], k: int) -> list[int]:
    """``torch.topk(key, k).indices``, as the accumulator takes them: in Python where the k largest
    and their order are unique, else torch's own (its order among equal values is the report's)."""
    order = sorted(range(len(key)), key=key.__getitem__, reverse=True)
    values = [key[t] for t in order[: k + 1]]
    if not any(math.isnan(v) for v in values) and all(a > b for a, b in itertools.pairwise(values)):
        return order[:k]
    return torch.tensor(key, dtype=torch.float64).topk(k).indices.tolist()


class _Pair:
    """``compare.PairAccumulator`` for one block per pair, on lists."""

    def __init__(self, output: OutputBlock, leaf: Leaf, max_worst: int) -> None:
        self.output, self.leaf, self.max_worst = output, leaf, max_worst
        self.checked = self.failed = self.kinks = self.nonfinite = 0
        self.wide_only = 0  # elements that failed only in the float64 run of the backward
        self.max_abs = self.max_rel = self.max_ratio = 0.0
        self.full = {k: [0.0] * (output.size * leaf.size) for k in ("a", "n", "b")}
        self.map: list[float] | None = None
        self.worst: list[tuple[int, float, ElementError]] = []

    def add(
        self,
        c: int,
        rows: list[int],
        analytic: list[list[float]],
        diff: FloatDifferences,
        verdicts: list[list[FloatVerdict]],
    ) -> None:
        if not rows:
            return
        flat = [(k, j) for j in range(c) for k in range(len(rows))]  # (m, c) views of (c, m) memory
        self.checked += len(flat)
        n_failed = sum(verdicts[k][j].failed for k, j in flat)
        n_kinks = sum(verdicts[k][j].kink for k, j in flat)
        self.failed += n_failed
        self.kinks += n_kinks
        self.nonfinite += sum(verdicts[k][j].nonfinite for k, j in flat)
        errors = [verdicts[k][j].error for k, j in flat]
        self.max_abs = max(self.max_abs, max(errors))
        rel = [
            0.0 if e == 0 or diff.value[k][j] == 0 else e / abs(diff.value[k][j])
            for e, (k, j) in zip(errors, flat, strict=True)
        ]
        self.max_rel = max(self.max_rel, max(rel))
        self.max_ratio = max(self.max_ratio, max(verdicts[k][j].ratio for k, j in flat))
        width = self.leaf.size
        for k, j in flat:
            at = rows[k] * width + j
            self.full["a"][at] = analytic[k][j]
            self.full["n"][at] = diff.value[k][j]
            self.full["b"][at] = diff.bar[k][j]
        if n_failed:
            self.map = [0.0] * (self.output.size * width)
            for k, j in flat:
                self.map[rows[k] * width + j] = max(0.0, min(verdicts[k][j].ratio, 1e300))
        ratios = [verdicts[k][j].ratio for k, j in flat]
        ranked = n_failed or n_kinks
        for level in (_FAILED, _KINK, _PASSED) if ranked else (_PASSED,):
            if ranked:
                rank = [
                    _FAILED if verdicts[k][j].failed else _KINK if verdicts[k][j].kink else _PASSED
                    for k, j in flat
                ]
                key = [r if g == level else -1.0 for r, g in zip(ratios, rank, strict=True)]
                count = rank.count(level)
            else:
                key, count = ratios, len(ratios)
            if count:
                for t in _top(key, min(self.max_worst, count)):
                    k, j = flat[t]
                    self._keep(level, rows[k], j, analytic[k][j], diff, k, verdicts[k][j])
        self.worst.sort(key=lambda item: (-item[0], -item[1]))
        del self.worst[self.max_worst :]

    def _keep(
        self, rank: int, row: int, col: int, analytic: float, diff: FloatDifferences, k: int, v: FloatVerdict
    ) -> None:
        out_index, out_part = flat_index(row, self.output.shape, self.output.is_complex)
        in_index, in_part = flat_index(col, self.leaf.shape, self.leaf.is_complex)
        element = ElementError(
            output_index=out_index,
            input_index=in_index,
            output_part=out_part,
            input_part=in_part,
            analytic=analytic,
            numeric=diff.value[k][col],
            error_bar=diff.bar[k][col],
            tolerance=v.tolerance,
            kink=v.kink,
        )
        self.worst.append((rank, v.ratio, element))

    def report(
        self, nondeterminism: float | None, nonlinearity: float | None, nondet_tol: float
    ) -> PairReport:
        status = pair_status(
            nonfinite=bool(self.nonfinite),
            nondeterministic=nondeterminism is not None and nondeterminism > nondet_tol,
            failed=bool(self.failed),
            kinks=bool(self.kinks),
            nonlinear=nonlinearity is not None,
        )
        error_map = None
        if status.failed:
            values = self.map or [0.0] * (self.output.size * self.leaf.size)
            width = self.leaf.size
            error_map = [values[r * width : (r + 1) * width] for r in range(self.output.size)]
        worst = reported_worst(self.worst, failed=self.failed, kinks=self.kinks)
        return PairReport(
            **pair_fields(self.output, self.leaf),
            check=Check.REVERSE,
            status=status,
            mode="full",
            max_abs_error=self.max_abs,
            max_rel_error=self.max_rel,
            max_error_ratio=self.max_ratio,
            elements_checked=self.checked,
            elements_failed=self.failed,
            kinks=self.kinks,
            worst=worst,
            analytic=self.full["a"],
            numeric=self.full["n"],
            error_bars=self.full["b"],
            nondeterminism=nondeterminism,
            error_map=error_map,
            message=(
                nonlinear_message(nonlinearity)
                if nonlinearity is not None
                else wide_only_message(self.leaf, self.wide_only)
            ),
        )
