"""Fast mode for small float64 problems, on Python floats.

A fast check of a few dozen elements costs what its torch ops cost to dispatch, not what they
compute: directions, perturbed copies, differences, projections and the verdict take some hundred
ops on tensors of a handful of numbers. Here the evaluations and the backward are
``fast.run_fast``'s own calls (``Context.evaluate``, ``Analytic.rows``, the same seeded draws in
the same order); their values come to Python once, and every formula is written out per element
in the same order of operations. The sums of the projections are left to torch, one reduction
per length (a row sums to the same bits whatever tensor holds it), so the scalars judged are
the ones the tensor path judges. Tests hold the reports to the tensor path's.

Only float64 problems without a float64 reference take this path: there a perturbed value is
the float64 sum, as Python computes it.
"""

from __future__ import annotations

import math
import time

import torch

from gradcheck_svc.engine.agreement import largest_change_of_floats
from gradcheck_svc.engine.compare import pair_fields, pair_status
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.numeric import NODES
from gradcheck_svc.engine.probes import random_cotangents, random_direction_rows
from gradcheck_svc.engine.problem import Leaf, OutputBlock
from gradcheck_svc.engine.tiny import FloatDifferences, differences_on_floats, judge_floats
from gradcheck_svc.report import Check, PairReport, Status

# One-sided differences of a projection further apart than this share of its value: a kink within
# the step. Smooth functions stay far below at the default step (the corpus's, float64, at most
# 0.5%, and then where the projection cancels); a jump this small already widens the bar past a
# 1% error.
_ROUGH_SPREAD = 2.0**-7

__all__ = [
    "ENABLED",
    "direction_step",
    "judged_on_floats",
    "message",
    "reverse_projections",
    "rough_projection",
    "run_fast_on_floats",
]

ENABLED = True  # off: every fast check takes the tensor path (tests compare the two)

# Per leaf, projections times its elements, and projections times output elements times leaves,
# at most: the float arithmetic costs a few microseconds per element and output, the batched
# tensor path (fast_batched.py) some forty ops for every leaf together.
_LEAF_ELEMENTS = 64
_OUTPUT_ELEMENTS = 16


def _applies(ctx: Context) -> bool:
    problem, count = ctx.problem, ctx.options.projections
    if not ENABLED or ctx.wide_analytic is not None or ctx.forward_rounding is not None:
        return False
    if (
        ctx.numeric_problem is not problem
        or count * problem.n_outputs * len(problem.leaves) > _OUTPUT_ELEMENTS
    ):
        return False
    leaves = problem.leaves
    if any(leaf.dtype != torch.float64 or not 0 < count * leaf.size <= _LEAF_ELEMENTS for leaf in leaves):
        return False
    return all(block.dtype == torch.float64 and block.size > 0 for block in problem.outputs)


def run_fast_on_floats(ctx: Context) -> tuple[list[PairReport], list[tuple[int, int]]] | None:
    """``fast.run_fast``'s reports before any re-check, and the failing pairs ``(output, leaf)``;
    None where the problem is not a small float64 one."""
    if not _applies(ctx):
        return None
    problem, options = ctx.problem, ctx.options
    count = options.projections
    generator = torch.Generator().manual_seed(options.seed)
    device = ctx.f0.device
    ctx.check_limits(len(problem.outputs) * count * len(problem.leaves), 3 * count * len(problem.leaves))

    # Numeric side, per leaf: directions (count, n_i) and the differences along them (M, count).
    f0 = ctx.numeric_f0.tolist()
    outputs = list(range(len(f0)))
    directions: list[list[list[float]]] = []
    numeric: list[FloatDifferences] = []
    t0 = time.perf_counter()
    for i, leaf in enumerate(problem.leaves):
        ctx.poll()
        x = leaf.real.tolist()
        u = random_direction_rows(x, count, generator)
        t = direction_step(ctx, leaf)
        steps = [node * t for node in NODES]
        batch = [[xj + step * uj for xj, uj in zip(x, row, strict=True)] for step in steps for row in u]
        # the calls ``evaluate`` makes, on fresh copies of the leaf made from the floats where it
        # would call fn row by row (no batch to build, stack and read back)
        evaluated = ctx.evaluate_values(i, batch, columns=count)
        if evaluated is None:
            evaluated = ctx.evaluate(i, torch.tensor(batch, dtype=torch.float64, device=device)).tolist()
        offsets = [[step] * count for step in steps]
        numeric.append(
            differences_on_floats(evaluated, f0, offsets, ctx.numeric_machine_eps, [1.0] * count, outputs)
        )
        directions.append(u)
    ctx.timed("numeric_s", t0)

    t0 = time.perf_counter()
    cotangents, grads, again = reverse_projections(ctx, count, generator)
    ctx.timed("analytic_s", t0)

    sums = _Sums()
    cot = cotangents.tolist()
    grad_rows = [g.tolist() for g in grads]
    pairs = []
    for o, block in enumerate(problem.outputs):
        rows = slice(block.offset, block.offset + block.size)
        for i in range(len(problem.leaves)):
            diff, u = numeric[i], directions[i]
            fields = []  # per direction: analytic, the five projected parts, |g u|, |v| |R|
            for p in range(count):
                v = cot[o * count + p][rows]
                size = [abs(e) for e in v]
                gu = [g * e for g, e in zip(grad_rows[i][o * count + p], u[p], strict=True)]
                value = [r[p] for r in diff.value[rows]]
                fields.append(
                    [
                        sums.add(gu),
                        sums.add([a * b for a, b in zip(v, value, strict=True)]),
                        sums.add([a * r[p] for a, r in zip(size, diff.bar[rows], strict=True)]),
                        sums.add([a * r[p] for a, r in zip(v, diff.forward[rows], strict=True)]),
                        sums.add([a * r[p] for a, r in zip(v, diff.backward[rows], strict=True)]),
                        sums.add([a * r[p] for a, r in zip(size, diff.one_sided_bar[rows], strict=True)]),
                        sums.add([abs(e) for e in gu]),
                        sums.add([a * abs(b) for a, b in zip(size, value, strict=True)]),
                    ]
                )
            nondet = 0.0
            if again is not None:
                first = [e for row in grad_rows[i][o * count : (o + 1) * count] for e in row]
                later = [e for row in again[i][o * count : (o + 1) * count].tolist() for e in row]
                nondet = largest_change_of_floats(first, later)
            pairs.append((o, i, fields, nondet))

    total = sums.totals()
    reports: list[PairReport] = []
    failing: list[tuple[int, int]] = []
    for o, i, fields, nondet in pairs:
        # per field, its value along each direction
        a, *parts, gu_size, vr_size = ([total[row[k]] for row in fields] for k in range(8))
        scale = [s + r for s, r in zip(gu_size, vr_size, strict=True)]
        report = judged_on_floats(ctx, problem.outputs[o], problem.leaves[i], a, parts, scale, nondet)
        reports.append(report)
        if report.status in (Status.FAIL, Status.NONFINITE):
            failing.append((o, i))
    return reports, failing


class _Sums:
    """Sums of lists of floats, each by torch's reduction (rows of one length in one tensor)."""

    def __init__(self) -> None:
        self._rows: dict[int, list[list[float]]] = {}
        self._keys: list[tuple[int, int]] = []

    def add(self, row: list[float]) -> int:
        """Queue ``row``; its sum is ``totals()[key]``."""
        same = self._rows.setdefault(len(row), [])
        self._keys.append((len(row), len(same)))
        same.append(row)
        return len(self._keys) - 1

    def totals(self) -> list[float]:
        by_length = {
            # one term: torch's sum is 0 + x (-0.0 sums to 0.0), no op needed
            n: [row[0] + 0.0 for row in rows]
            if n == 1
            else torch.tensor(rows, dtype=torch.float64).sum(dim=1).tolist()
            for n, rows in self._rows.items()
        }
        return [by_length[n][k] for n, k in self._keys]


def judged_on_floats(
    ctx: Context,
    block: OutputBlock,
    leaf: Leaf,
    a: list[float],
    parts: list[list[float]],
    scale: list[float],
    nondet: float,
) -> PairReport:
    """A pair's projections, one per direction, judged without a float64 reference or rounding
    allowance (``fast._judged``'s verdict with ``judge``'s arithmetic on floats, tiny.py):
    ``a`` the analytic values, ``parts`` the five fields of ``numeric.Differences``."""
    options = ctx.options
    count = options.projections
    value, bar, forward, backward, one_sided_bar = ([row] for row in parts)
    numeric = FloatDifferences(0, 0)
    numeric.value, numeric.bar, numeric.forward, numeric.backward = value, bar, forward, backward
    numeric.one_sided_bar = one_sided_bar
    verdicts = judge_floats([a], numeric, ctx.tolerance(block, leaf), scale=[scale])[0]
    ctx.rough_projections += sum(
        rough_projection(f, b, d) for f, b, d in zip(forward[0], backward[0], value[0], strict=True)
    )
    errors = [abs(x - y) for x, y in zip(a, value[0], strict=True)]
    finite = [(e, e / max(abs(y), 1e-300)) for e, y in zip(errors, value[0], strict=True) if math.isfinite(e)]
    status = pair_status(
        nonfinite=any(v.nonfinite for v in verdicts),
        nondeterministic=nondet > options.nondet_tol,
        failed=any(v.failed for v in verdicts),
        kinks=any(v.kink for v in verdicts),
    )
    return PairReport(
        **pair_fields(block, leaf),
        check=Check.REVERSE,
        status=status,
        mode="fast",
        max_abs_error=max((e for e, _ in finite), default=0.0),
        max_rel_error=max((r for _, r in finite), default=0.0),
        max_error_ratio=max(v.ratio for v in verdicts),
        elements_checked=count,
        elements_failed=sum(v.failed for v in verdicts),
        kinks=sum(v.kink for v in verdicts),
        nondeterminism=nondet if options.check_nondeterminism else None,
        message=message(count, 0),
    )


def direction_step(ctx: Context, leaf: Leaf) -> float:
    """The step along a random direction of ``leaf`` (its elements of scale 1): ``numeric.steps``
    at x = 0, a power of two (times ``ctx.direction_scale``, a power of two too)."""
    return 2.0 ** round(math.log2(ctx.eps(leaf))) * ctx.direction_scale


def reverse_projections(
    ctx: Context, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor] | None]:
    """J^T v for ``count`` seeded cotangents per output block: the cotangents, the backward's
    rows, and the same batch run a second time to detect nondeterminism (None when not checked)."""
    cotangents = random_cotangents(ctx.problem.outputs, count, generator, ctx.f0.device)
    if ctx.cotangent_mask is not None:  # output elements left out (``fast.run_fast``)
        cotangents = cotangents * ctx.cotangent_mask
    grads = ctx.analytic.rows(cotangents)
    again = ctx.analytic.rows(cotangents) if ctx.options.check_nondeterminism else None
    return cotangents, grads, again


def message(count: int, wide_only: int) -> str:
    """A fast-mode pair's message: how many projections, and how many failed only in float64."""
    return f"{count} random projections v^T J u" + (
        f"; {wide_only} fail only in the float64 run of the backward" if wide_only else ""
    )


def rough_projection(forward: float, backward: float, value: float) -> bool:
    """Whether a projection's one-sided differences are further apart than a smooth function's
    curvature puts them at this step (``_ROUGH_SPREAD`` of the value): a kink within the step
    along the direction, such as an element crossing a support boundary. Its error bar then spans
    the jump, wide enough to hide a wrong backward; NaN is not rough (it is judged as such)."""
    return abs(forward - backward) > _ROUGH_SPREAD * abs(value)
