"""Fast mode with a few directions: every leaf's differences and projections in one set of ops.

With fewer directions than a noise median needs (``numeric._MIN_NOISE_SAMPLES``), each output
element's differences stand alone: the formulas of ``numeric.differences`` are elementwise,
with each output's noise the floor of ``row_noise``. All leaves share the outputs and, with one
step for all, the offsets, so their evaluations stack into one ``(L, 3, P, M)`` tensor and a
check costs some forty ops however many leaves it has, instead of that many per leaf. The
projections on the cotangents are one product and one sum per output block. The evaluations
and the backward are ``fast._projected``'s own calls, with the same seeded draws in the same
order; tests hold the reports to that path's.

The third node is adaptive (``_settled``): every leaf is moved to x - h and x + h first, and to
x + 2h only where some projection does not pass clearly on the central difference. A settled
pair is reported on D with the bars of full mode's clear pass; tests hold its verdicts to those
of the path that always takes the third node, and that path's reports to the per-leaf path's.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from gradcheck_svc.engine.agreement import largest_change
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.fast_floats import direction_step, judged_on_floats, reverse_projections
from gradcheck_svc.engine.numeric import (
    _FLOOR_ULPS,
    _KINK_BARS,
    _MIN_NOISE_SAMPLES,
    NODES,
    SMOOTH_SPREAD,
    derivative_weights,
)
from gradcheck_svc.engine.probes import random_directions_of
from gradcheck_svc.engine.problem import OutputBlock
from gradcheck_svc.report import PairReport, Status

__all__ = ["ENABLED", "run_fast_batched"]

ENABLED = True  # off: each leaf takes its own ops (tests compare the two)
# off: every leaf takes its third node before any verdict (tests compare the verdicts)
ADAPTIVE = True


def _step(ctx: Context) -> float | None:
    """The one power-of-two step every leaf is moved by (``numeric.steps`` at x = 0), or None."""
    steps = {direction_step(ctx, leaf) for leaf in ctx.numeric_problem.leaves}
    return steps.pop() if len(steps) == 1 else None


def run_fast_batched(ctx: Context) -> tuple[list[PairReport], list[tuple[int, int]]] | None:
    """``fast._projected``'s reports and failing pairs; None with a float64 reference (its
    allowances are per pair), with a noise median to take, or with leaves of different steps."""
    problem, options = ctx.problem, ctx.options
    count = options.projections
    if not ENABLED or count >= _MIN_NOISE_SAMPLES or ctx.wide_analytic is not None:
        return None
    t = _step(ctx)
    if ctx.forward_rounding is not None or t is None or problem.n_outputs == 0:
        return None
    if any(leaf.size == 0 for leaf in problem.leaves):
        return None
    generator = torch.Generator().manual_seed(options.seed)
    leaves = ctx.numeric_problem.leaves
    ctx.check_limits(len(problem.outputs) * count * len(leaves), 3 * count * len(leaves))

    t0 = time.perf_counter()
    # Every leaf's directions side by side, (P, N); the leaves are moved to x + (node t) u.
    reals = [leaf.real for leaf in leaves]
    directions = random_directions_of(reals, count, generator)
    steps = [node * t for node in NODES]
    sizes = [leaf.size for leaf in leaves]
    ends = list(itertools.accumulate(sizes))
    bounds = [(end - leaf.size, end) for end, leaf in zip(ends, leaves, strict=True)]
    everyone = list(range(len(leaves)))
    # Adaptive: x - h and x + h first; x + 2h only for the leaves whose verdict they leave in
    # doubt. The test costs about the ops of the differences it spares where every leaf settles.
    adaptive = ADAPTIVE
    first = len(NODES) - 1 if adaptive else len(NODES)
    evaluated = _evaluated(ctx, directions, steps[:first], bounds, everyone, count)
    ctx.timed("numeric_s", t0)

    t0 = time.perf_counter()
    cotangents, grads, again = reverse_projections(ctx, count, generator)
    ctx.timed("analytic_s", t0)

    # the backward's re-run, compared leaf by leaf only where it differs somewhere
    rerun = again is not None and not all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))
    # Per output block, its cotangents and, per leaf, a = v^T J u and sum |g u| along each direction.
    blocks = []
    whole = len(problem.outputs) == 1  # one block: every row is its own
    for o, block in enumerate(problem.outputs):
        picked = slice(o * count, (o + 1) * count)
        v = cotangents if whole else cotangents[picked, block.rows]  # (P, m_o)
        # g u of every leaf side by side, (P, N), and its sums leaf by leaf
        rows = grads if whole else [grad[picked] for grad in grads]
        g = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        gu = g * directions
        both = torch.stack([gu, gu.abs()])
        if len(bounds) == 1:
            sums = [both.sum(dim=-1).tolist()]
        else:  # each leaf's slice summed on its own, the sums read back at once
            sums = torch.stack([part.sum(dim=-1) for part in both.split_with_sizes(sizes, dim=-1)]).tolist()
        blocks.append((block, picked, v, v.abs(), sums, rerun))

    t0 = time.perf_counter()
    settled: dict[tuple[int, int], tuple[list[list[float]], list[float]]] = {}
    doubtful = everyone
    if adaptive:
        settled = _settled(ctx, evaluated, t, count, blocks)
        doubtful = [i for i in everyone if any((o, i) not in settled for o in range(len(blocks)))]
        if doubtful:
            third = _evaluated(ctx, directions, steps[first:], bounds, doubtful, 0)
            chosen = evaluated if len(doubtful) == len(everyone) else evaluated[doubtful]
            evaluated = torch.cat([chosen, third], dim=1)
    parts = None
    if doubtful:
        parts = _differences(evaluated, ctx.numeric_f0, t, ctx.numeric_machine_eps, count)
        ctx.fast_parts.append((t, parts))
    ctx.timed("numeric_s", t0)

    reports: list[PairReport] = []
    failing: list[tuple[int, int]] = []
    for o, (block, picked, v, size, sums, rerun) in enumerate(blocks):
        projected = []
        if parts is not None:
            # values and one-sided differences project on v, error bars and |R| on |v|
            weights = torch.stack([v, size, v, v, size, size])
            mine = parts if whole else parts[..., block.rows]
            projected = (weights * mine).sum(dim=-1).tolist()  # (L', 6, P)
        for i, leaf in enumerate(problem.leaves):
            a, gu_size = sums[i]
            if (o, i) in settled:
                five, numeric_size = settled[o, i]
            else:
                *five, numeric_size = projected[doubtful.index(i)]
            scale = [s + r for s, r in zip(gu_size, numeric_size, strict=True)]
            nondet = largest_change(grads[i][picked], again[i][picked]) if rerun and again else 0.0
            report = judged_on_floats(ctx, block, leaf, a, five, scale, nondet)
            reports.append(report)
            if report.status in (Status.FAIL, Status.NONFINITE):
                failing.append((o, i))
    return reports, failing


def _evaluated(
    ctx: Context,
    directions: torch.Tensor,
    steps: list[float],
    bounds: list[tuple[int, int]],
    picked: list[int],
    columns: int,
) -> torch.Tensor:
    """f at x + step u for every step and direction ``(P, N)`` of the leaves ``picked``: their
    outputs ``(len(picked), len(steps) * P, M)``, step-major per leaf. ``columns``: the
    directions each leaf's batch completes, for progress."""
    leaves = ctx.numeric_problem.leaves
    count = directions.shape[0]
    rows = len(steps) * count
    if all(ctx.plain_copies(i, rows) for i in picked):
        # fn called row by row anyway: each copy made fresh in its leaf's shape, in one op (t u
        # is exact, a power of two times a few-bit direction: the sum rounds once, as in a batch)
        outputs: list[torch.Tensor] = []
        rows_of = directions.unbind(0)
        for i in picked:
            ctx.poll()
            lo, hi = bounds[i]
            leaf = leaves[i]
            x, dtype = leaf.as_called, leaf.real_dtype
            along = [row[lo:hi].view(leaf.shape) for row in rows_of]
            copies = [torch.add(x, u, alpha=step) for step in steps for u in along]
            if dtype != torch.float64:
                copies = [copy.to(dtype) for copy in copies]
            outputs += ctx.evaluate_copies(i, copies, columns)
        return torch.stack(outputs).reshape(len(picked), rows, -1)
    node_steps = torch.tensor(steps, dtype=torch.float64, device=directions.device).reshape(-1, 1, 1)
    found: list[torch.Tensor] = []
    for i in picked:
        ctx.poll()
        lo, hi = bounds[i]
        leaf = leaves[i]
        moved = leaf.real.to(torch.float64) + node_steps * directions[:, lo:hi]
        found.append(ctx.evaluate(i, moved.reshape(rows, -1).to(leaf.real_dtype), columns=columns))
    return torch.stack(found)


def _settled(
    ctx: Context,
    stacked: torch.Tensor,
    t: float,
    count: int,
    blocks: list[tuple[OutputBlock, slice, torch.Tensor, torch.Tensor, list[list[list[float]]], bool]],
) -> dict[tuple[int, int], tuple[list[list[float]], list[float]]]:
    """The pairs ``(output, leaf)`` whose verdict the central difference settles along every
    direction, with the five projected parts they are judged on (D with the bars of a clear pass)
    and the projected |D|: ``compare.clear_passes``' argument on the projections.

    Along a direction, R = D + E with |E| <= T, the projected truncation |R - D|; the tolerance
    judged on R holds ``bars`` times T in its bar and loses at most ``(rtol + atol_factor) T`` of
    its other terms, so with ``bars >= 1 + rtol + atol_factor``,
    ``|a - D| <= rtol |D| + bars * noise + atol`` implies a pass on R. The test asks for half of
    that (a margin for the noise floor, taken from |D| instead of |R|), with every output element
    smooth at the scale of the step (no kink the third node could show) and everything finite.
    """
    nodes = stacked.reshape(stacked.shape[0], 2, count, -1)
    t_minus, t_plus, t_plus2 = (node * t for node in NODES)
    moved_minus, d_plus = torch.sub(nodes, ctx.numeric_f0).unbind(1)  # f(x -+ h) - f(x)
    value = torch.sub(d_plus, moved_minus).div_(t_plus - t_minus)  # D, (L, P, M)
    spread = d_plus.add_(moved_minus).abs_().div_(t_plus)  # |D+ - D-|
    magnitude = value.abs()
    # Each output's noise, the floor of ``row_noise``; where it is not finite, neither are the
    # projections it enters, which stay in doubt. (|D| summed over one direction is that |D|.)
    summed = magnitude[:, 0] if count == 1 else magnitude.sum(dim=1)
    sigma = torch.add(summed, ctx.numeric_f0.abs()).mul_(_FLOOR_ULPS * ctx.numeric_machine_eps)
    sigma = sigma.unsqueeze(1)  # (L, 1, M)
    w_minus, w_plus, w_plus2 = derivative_weights(t_minus, t_plus, t_plus2)
    gain = 1.5 * math.sqrt(w_minus**2 + (w_minus + w_plus + w_plus2) ** 2 + w_plus**2 + w_plus2**2)
    side_gain = 1.5 * (2**0.5) / t_plus
    smooth = spread <= torch.mul(magnitude, SMOOTH_SPREAD).add_(sigma, alpha=2 * _KINK_BARS * side_gain)
    central = torch.stack([value, sigma.expand_as(value), spread, magnitude], dim=1)  # (L, 4, P, M)

    settled: dict[tuple[int, int], tuple[list[list[float]], list[float]]] = {}
    leaves = ctx.problem.leaves
    whole = len(blocks) == 1  # one block: every output row is its own, no slice to take
    for o, (block, _, v, size, sums, _) in enumerate(blocks):
        weights = torch.stack([v, size, size, size])
        mine = central if whole else central[..., block.rows]
        projected = (weights * mine).sum(dim=-1).tolist()  # (L, 4, P)
        flat = (smooth if whole else smooth[..., block.rows]).all(dim=-1).tolist()  # (L, P)
        for i, leaf in enumerate(leaves):
            tol = ctx.tolerance(block, leaf)
            if tol.bars < 1.0 + tol.rtol + tol.atol_factor:
                continue
            a, gu_size = sums[i]
            d, sigmas, s, m = projected[i]
            n = [gain * x for x in sigmas]  # the noise part of the Richardson bar
            clear = True
            for p in range(count):
                atol = tol.atol if tol.atol is not None else tol.atol_factor * (gu_size[p] + m[p])
                half = (tol.rtol * abs(d[p]) + tol.bars * n[p] + atol + tol.slack) / 2
                error = abs(a[p] - d[p])
                if not (flat[i][p] and error <= half and math.isfinite(half) and math.isfinite(s[p])):
                    clear = False
                    break
            if clear:
                # ``Central.reported``: D for both one-sided differences, the noise part of the
                # Richardson bar plus D's truncation on the scale ``smooth`` vouches for
                bar = [x + y * (SMOOTH_SPREAD / 6) for x, y in zip(n, s, strict=True)]
                settled[o, i] = ([d, bar, d, d, bar], m)
    return settled


def _differences(
    stacked: torch.Tensor, f0: torch.Tensor, t: float, machine_eps: float, count: int
) -> torch.Tensor:
    """``numeric.differences`` of every leaf along its ``count`` directions from the outputs at
    the nodes ``(L, 3 * P, M)`` (node-major per leaf): its five parts and |R|, ``(L, 6, P, M)``."""
    nodes = stacked.reshape(stacked.shape[0], len(NODES), count, -1)
    t_minus, t_plus, t_plus2 = (node * t for node in NODES)
    w_minus, w_plus, w_plus2 = derivative_weights(t_minus, t_plus, t_plus2)
    # f(x + node h) - f(x) at every node in one op; numeric.differences takes f(x) - f(x - h)
    # for the first, d_minus = -moved_minus, whose sign goes into the weights (exactly so).
    moved_minus, d_plus, d_plus2 = torch.sub(nodes, f0.unsqueeze(0)).unbind(1)
    richardson = d_plus * w_plus
    richardson.add_(moved_minus * w_minus).add_(d_plus2 * w_plus2)
    inv_span = 1.0 / (t_plus - t_minus)
    truncation = d_plus * (w_plus - inv_span)
    truncation.add_(moved_minus * -(-w_minus - inv_span)).add_(d_plus2 * w_plus2).abs_()
    forward = d_plus / t_plus
    backward = moved_minus / t_minus
    one_sided = (d_plus2 / t_plus2).sub_(forward).abs_()
    # Each output's noise: the floor of ``row_noise`` (no median from so few directions), from
    # |R| summed over the leaf's directions (each direction's x scale is 1).
    magnitude = richardson.abs()
    terms = magnitude[:, 0]
    for p in range(1, count):
        terms = terms + magnitude[:, p]
    terms = torch.nan_to_num(terms, nan=0.0, posinf=0.0)
    sigma = (_FLOOR_ULPS * machine_eps * (torch.nan_to_num(f0.abs(), nan=0.0, posinf=0.0) + terms)).unsqueeze(
        1
    )
    gain = 1.5 * math.sqrt(w_minus**2 + (w_minus + w_plus + w_plus2) ** 2 + w_plus**2 + w_plus2**2)
    bar = truncation.add_(sigma * gain)
    one_sided_bar = one_sided.add_(sigma * (1.5 * (2**0.5) / t_plus))
    return torch.stack([richardson, bar, forward, backward, one_sided_bar, magnitude], dim=1)
