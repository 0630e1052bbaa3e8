"""Fast mode with a few directions: every leaf's differences and projections in one set of ops.

With fewer directions than a noise median needs (``numeric._MIN_NOISE_SAMPLES``), each output
element's differences stand alone: the formulas of ``numeric.differences`` are elementwise,
with each output's noise the floor of ``row_noise``. All leaves share the outputs and, with one
step for all, the offsets, so their evaluations stack into one ``(L, 3, P, M)`` tensor and a
check costs some forty ops however many leaves it has, instead of that many per leaf. The
projections on the cotangents are one product and one sum per output block. The evaluations
and the backward are ``fast._projected``'s own calls, with the same seeded draws in the same
order; tests hold the reports to that path's.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from gradcheck_svc.engine.agreement import largest_change
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.fast_floats import direction_step, judged_on_floats, reverse_projections
from gradcheck_svc.engine.numeric import _FLOOR_ULPS, _MIN_NOISE_SAMPLES, NODES, derivative_weights
from gradcheck_svc.engine.probes import random_directions_of
from gradcheck_svc.report import PairReport, Status

__all__ = ["ENABLED", "run_fast_batched"]

ENABLED = True  # off: each leaf takes its own ops (tests compare the two)


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
    device = ctx.f0.device
    leaves = ctx.numeric_problem.leaves
    ctx.check_limits(len(problem.outputs) * count * len(leaves), 3 * count * len(leaves))

    t0 = time.perf_counter()
    # Every leaf's directions side by side, (P, N), and x + (node t) u at every node: (3, P, N).
    reals = [leaf.real for leaf in leaves]
    directions = random_directions_of(reals, count, generator)
    steps = torch.tensor([node * t for node in NODES], dtype=torch.float64, device=device).reshape(-1, 1, 1)
    base = reals[0] if len(reals) == 1 else torch.cat(reals)
    moved = base.to(torch.float64) + steps * directions
    ends = list(itertools.accumulate(leaf.size for leaf in leaves))
    bounds = [(end - leaf.size, end) for end, leaf in zip(ends, leaves, strict=True)]
    evaluated: list[torch.Tensor] = []
    for i, leaf in enumerate(leaves):
        ctx.poll()
        lo, hi = bounds[i]
        batch = moved[..., lo:hi].reshape(len(NODES) * count, -1).to(leaf.real_dtype)
        evaluated.append(ctx.evaluate(i, batch))
    parts = _differences(torch.stack(evaluated), ctx.numeric_f0, t, ctx.numeric_machine_eps, count)
    ctx.timed("numeric_s", t0)

    t0 = time.perf_counter()
    cotangents, grads, again = reverse_projections(ctx, count, generator)
    ctx.timed("analytic_s", t0)

    reports: list[PairReport] = []
    failing: list[tuple[int, int]] = []
    for o, block in enumerate(problem.outputs):
        picked = slice(o * count, (o + 1) * count)
        v = cotangents[picked, block.rows]  # (P, m_o)
        size = v.abs()
        # values and one-sided differences project on v, error bars and |R| on |v|
        weights = torch.stack([v, size, v, v, size, size])
        projected = (weights * parts[..., block.rows]).sum(dim=-1).tolist()  # (L, 6, P)
        # g u of every leaf side by side, (P, N), and its sums leaf by leaf: a and sum |g u|
        g = grads[0][picked] if len(grads) == 1 else torch.cat([grad[picked] for grad in grads], dim=1)
        gu = g * directions
        both = torch.stack([gu, gu.abs()])
        for i, leaf in enumerate(problem.leaves):
            lo, hi = bounds[i]
            a, gu_size = both[..., lo:hi].sum(dim=-1).tolist()
            *five, numeric_size = projected[i]
            scale = [s + r for s, r in zip(gu_size, numeric_size, strict=True)]
            nondet = largest_change(grads[i][picked], again[i][picked]) if again is not None else 0.0
            report = judged_on_floats(ctx, block, leaf, a, five, scale, nondet)
            reports.append(report)
            if report.status in (Status.FAIL, Status.NONFINITE):
                failing.append((o, i))
    return reports, failing


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
