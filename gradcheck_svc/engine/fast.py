"""Fast mode: random projections ``v^T J u`` instead of the whole Jacobian.

For each leaf, a few seeded random directions ``u`` are evaluated with the same
four-node finite differences as full mode (one batched call), which gives
``J u`` with an error bar per output element. For each output, seeded random
cotangents ``v`` give ``J^T v`` by one batched backward. Each pair is then
judged on the scalars ``v^T J u``, against a tolerance made of the propagated
error bars (not a tolerance scaled by the input size). A failing pair is
re-checked in full mode, so the message still points at elements.
"""

from __future__ import annotations

import time

import torch

from gradcheck_svc.engine.agreement import largest_change, same_values
from gradcheck_svc.engine.compare import judge, merge_wide, pair_fields, pair_status
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.fast_batched import run_fast_batched
from gradcheck_svc.engine.fast_floats import (
    direction_step,
    judged_on_floats,
    message,
    reverse_projections,
    rough_projection,
    run_fast_on_floats,
)
from gradcheck_svc.engine.full import DENSE_ENTRIES, run_full
from gradcheck_svc.engine.numeric import (
    _FLOOR_ULPS,
    _KINK_BARS,
    NODES,
    SMOOTH_SPREAD,
    Differences,
    differences,
)
from gradcheck_svc.engine.probes import random_directions
from gradcheck_svc.engine.problem import Leaf, OutputBlock
from gradcheck_svc.engine.tiny import differences_on_floats
from gradcheck_svc.report import Check, PairReport, Status

__all__ = ["run_fast"]

# Projected outputs (P x M) up to this many take their differences on floats: there a few dozen
# elements cost less in Python than the tensor formulas' hundred-odd ops.
_FLOAT_ENTRIES = 48
_ROUGH_SHRINK = 2.0**-5  # the step's factor when a projection crossed a kink within the step
_ROUGH_EPS = 2.0**-52  # ... only where the numeric side is float64


def run_fast(ctx: Context) -> list[PairReport]:
    reports, failing = _projections(ctx)
    settled = all(report.status in (Status.PASS, Status.KINK) for report in reports)
    if settled and ctx.rough_projections and ctx.numeric_machine_eps <= _ROUGH_EPS and _repeatable(ctx):
        # A direction crossed a kink within the step (an element over a support boundary, a relu
        # input near 0): that projection's error bar spans the jump and can hide a wrong backward.
        # Such a kink is an accident of the step, not of the point, so the same directions are
        # taken again with a step 2^-5 as large; a kink at the point itself stays (relu at 0).
        # Only where the differences are float64: a smaller step in a low precision is noise.
        ctx.note(
            "a random direction crossed a kink within the step; fast mode took its projections "
            f"again with a step {_ROUGH_SHRINK:g} times as large"
        )
        ctx.direction_scale *= _ROUGH_SHRINK
        ctx.rough_projections = 0
        reports, failing = _projections(ctx)
        if ctx.rough_projections:
            ctx.note("the kink stayed at the smaller step: the kink is at the point itself")
    settled = all(report.status in (Status.PASS, Status.KINK) for report in reports)
    if settled and ctx.fast_parts and _repeatable(ctx):
        reports, failing = _without_kinked_outputs(ctx, reports, failing)
    if failing:
        written = _leaves_a_call_writes(ctx)
        if written:
            return [
                _written_leaves(report) if (report.output, report.input) in _names(ctx, failing) else report
                for report in reports
            ]
        reports = _recheck_in_full(ctx, reports, failing)
    return reports


def _without_kinked_outputs(
    ctx: Context, reports: list[PairReport], failing: list[tuple[int, int]]
) -> tuple[list[PairReport], list[tuple[int, int]]]:
    """The projections taken again without the output elements whose differences crossed a
    kink along a direction (``kinked_outputs``), where they passed with such elements.

    A projection sums every output element's differences, so one element whose kink lies within
    the step (a relu input near 0 among thousands) widens its error bar past a wrong backward
    anywhere else. The same directions with those elements' cotangents set to 0 are a projection
    like any other, of smooth elements only: the numeric side drops their differences and the
    backward their rows. Its verdict stands where it fails (and a full re-check then names the
    elements); where it passes, the first verdicts stand, kinks included."""
    kinked = kinked_outputs(ctx)
    # none: nothing to leave out; most: too little would be left to judge
    if kinked is None or not bool(kinked.any()) or 2 * int(kinked.sum()) > kinked.numel():
        return reports, failing
    ctx.note(
        f"{int(kinked.sum())} output elements crossed a kink within the step along a random "
        "direction; fast mode took its projections again without them"
    )
    ctx.cotangent_mask = (~kinked).to(torch.float64)
    try:
        again, again_failing = _projections(ctx)
    finally:
        ctx.cotangent_mask = None
    return (again, again_failing) if again_failing else (reports, failing)


def kinked_outputs(ctx: Context) -> torch.Tensor | None:
    """Per output element, whether along some direction of the last projections its one-sided
    differences lie further apart, or its error bar (the Richardson truncation: a kink between
    x + h and x + 2h leaves the one-sided differences level) is wider, than a smooth function's
    (``fast_batched._settled``'s test: ``SMOOTH_SPREAD`` of the difference or of the typical
    one along the direction, whichever is larger, above the noise):
    ``(M,)`` bool, None without differences (every pair settled on the central one)."""
    found = None
    f0 = ctx.numeric_f0.abs().nan_to_num(nan=0.0, posinf=0.0)
    for t, parts in ctx.fast_parts:
        m = parts.shape[-1]
        value, bar = parts[..., 0, :, :], parts[..., 1, :, :]
        forward, backward = parts[..., 2, :, :], parts[..., 3, :, :]
        magnitude = value.abs().nan_to_num_(nan=0.0, posinf=0.0)
        sigma = (magnitude + f0) * (_FLOOR_ULPS * ctx.numeric_machine_eps)
        # An element's differences measured on the scale of the typical one along the direction:
        # where its own derivative crosses 0 (x tanh x at 0), a smooth bend is no kink.
        typical = magnitude.mean(dim=-1, keepdim=True)
        smooth = torch.maximum(magnitude, typical).mul_(SMOOTH_SPREAD)
        smooth.add_(sigma, alpha=2 * _KINK_BARS * 1.5 * 2**0.5 / t)
        rough = ((forward - backward).abs() > smooth) | (bar > smooth)
        rough = rough.reshape(-1, m).any(dim=0)
        found = rough if found is None else found | rough
    return found


def _leaves_a_call_writes(ctx: Context) -> list[str]:
    """Checked inputs one call of fn changes, writes the version counter misses included.

    Fast mode hands fn fresh copies only, so a forward that writes into its input through
    ``.data`` moves no value the check reads, and a full re-check (which does read the input)
    would judge its Jacobian at a point fn has since moved. Asked only once projections failed:
    it costs one call of fn on copies."""
    leaves = {leaf.name for leaf in ctx.problem.leaves}
    return [name for name in ctx.problem.inputs_a_call_writes() if name in leaves]


def _names(ctx: Context, pairs: list[tuple[int, int]]) -> set[tuple[str, str]]:
    problem = ctx.problem
    return {(problem.outputs[o].name, problem.leaves[i].name) for o, i in pairs}


def _written_leaves(report: PairReport) -> PairReport:
    """A failed projection of a function that changes its own input: no Jacobian to judge."""
    report.status = Status.NONDETERMINISTIC
    report.message = "fn returned different values for the same input"
    return report


def _repeatable(ctx: Context) -> bool:
    # A forward that returns other values at the same point is rough for that reason alone (and
    # is reported as nondeterministic): another step would not settle it.
    return all(same_values(ctx.numeric_f0, again, ctx.numeric_machine_eps) for again in ctx.numeric_repeats)


def _projections(ctx: Context) -> tuple[list[PairReport], list[tuple[int, int]]]:
    # Small float64 problems on floats; a few directions with every leaf at once; else leaf by leaf.
    ctx.fast_parts = []
    found = run_fast_on_floats(ctx)
    if found is None:
        found = run_fast_batched(ctx)
    return found if found is not None else _projected(ctx)


def _projected(ctx: Context) -> tuple[list[PairReport], list[tuple[int, int]]]:
    """Every pair judged on its projections, and the failing pairs ``(output, leaf)``."""
    problem, options = ctx.problem, ctx.options
    count = options.projections
    generator = torch.Generator().manual_seed(options.seed)
    device = ctx.f0.device
    n_out = len(problem.outputs)
    ctx.check_limits(n_out * count * len(problem.leaves), 3 * count * len(problem.leaves))

    # Numeric side: J u for each leaf and direction, with error bars: per leaf the five parts of
    # its Differences, (5, P, M) (each part an (M, P) block transposed).
    directions: list[torch.Tensor] = []
    numeric: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for i, leaf in enumerate(ctx.numeric_problem.leaves):
        ctx.poll()
        u = random_directions(leaf.real, count, generator)
        t = direction_step(ctx, leaf)
        base = leaf.real.detach().to(torch.float64)
        batch = torch.cat([(base + node * t * u).to(leaf.real_dtype) for node in NODES])
        offsets = torch.tensor(NODES, dtype=torch.float64, device=device).unsqueeze(1).expand(3, count) * t
        evaluated = ctx.evaluate(i, batch)
        directions.append(u)
        if count * problem.n_outputs <= _FLOAT_ENTRIES:
            numeric.append(
                _differences_on_floats(evaluated, ctx.numeric_f0, offsets, ctx.numeric_machine_eps)
            )
        else:
            x_scale = torch.full((count,), 1.0, dtype=torch.float64, device=device)
            found = differences(
                evaluated, ctx.numeric_f0, offsets.contiguous(), ctx.numeric_machine_eps, x_scale
            )
            numeric.append(torch.stack([part.T for part in found.parts()]))
        ctx.fast_parts.append((t, numeric[-1]))
    ctx.timed("numeric_s", t0)

    # Analytic side: J^T v for seeded cotangents, one set per output block.
    t0 = time.perf_counter()
    cotangents, grads, again = reverse_projections(ctx, count, generator)
    wide_grads = ctx.wide_analytic.rows(cotangents) if ctx.wide_analytic is not None else None
    ctx.timed("analytic_s", t0)

    reports: list[PairReport] = []
    failing: list[tuple[int, int]] = []
    for o, block in enumerate(problem.outputs):
        v = cotangents[o * count : (o + 1) * count, block.rows]  # (P, m_o)
        # Values and one-sided differences project on v, error bars on |v|: one product for all five.
        weights = torch.stack([v, v.abs(), v, v, v.abs()])
        for i, leaf in enumerate(problem.leaves):
            parts = numeric[i][:, :, block.rows]  # (5, P, m_o)
            u = directions[i]
            g = grads[i][o * count : (o + 1) * count]  # (P, n_i)
            gu = g * u
            analytic = gu.sum(dim=1).unsqueeze(0)  # (1, P)
            projected = Differences(*(weights * parts).sum(dim=2).unsqueeze(1).unbind(0))
            # The user's dtype rounds each term v_i J_ij u_j: the scale of its rounding is that of
            # the terms summed, from both sides, not of the (possibly cancelling) projection.
            terms = gu.abs().sum(dim=1) + (weights[1] * parts[0].abs()).sum(dim=1)
            nondet = 0.0
            if again is not None and g.numel():
                nondet = largest_change(g, again[i][o * count : (o + 1) * count])
            allowance = ctx.rounding_allowance(block.rows, parts[0].T)  # (m_o, P) or None
            if allowance is None and wide_grads is None:
                # A few scalars per pair: judged on floats, with judge's arithmetic (tiny.py).
                a, *sums, scale = torch.cat([analytic, *projected.parts(), terms.unsqueeze(0)]).tolist()
                report = judged_on_floats(ctx, block, leaf, a, sums, scale, nondet)
            else:
                if allowance is not None:
                    allowance = (weights[1] * allowance.T).sum(dim=1).unsqueeze(0)
                wide = None
                if wide_grads is not None:
                    wide = (wide_grads[i][o * count : (o + 1) * count] * u).sum(dim=1).unsqueeze(0)
                report = _judged(ctx, block, leaf, analytic, projected, terms, allowance, wide, nondet)
            reports.append(report)
            if report.status in (Status.FAIL, Status.NONFINITE):
                failing.append((o, i))

    return reports, failing


def _differences_on_floats(
    evaluated: torch.Tensor, f0: torch.Tensor, offsets: torch.Tensor, machine_eps: float
) -> torch.Tensor:
    """``numeric.differences`` of a few projections on floats (tiny.py): its five parts, ``(5, P, M)``."""
    count, m = offsets.shape[1], f0.numel()
    found = differences_on_floats(
        evaluated.tolist(), f0.tolist(), offsets.tolist(), machine_eps, [1.0] * count, list(range(m))
    )
    fields = (found.value, found.bar, found.forward, found.backward, found.one_sided_bar)
    # (5, M, P) as computed, transposed by torch rather than element by element in Python
    return (
        torch.tensor(fields, dtype=torch.float64, device=f0.device)
        .reshape(5, m, count)
        .transpose(1, 2)
        .contiguous()
    )


def _judged(
    ctx: Context,
    block: OutputBlock,
    leaf: Leaf,
    analytic: torch.Tensor,
    projected: Differences,
    terms: torch.Tensor,
    allowance: torch.Tensor | None,
    wide: torch.Tensor | None,
    nondet: float,
) -> PairReport:
    """One pair's projections ``(1, P)`` judged on tensors: with the projected rounding
    ``allowance`` of a low-precision forward, and ``wide``, the float64 run of the backward
    projected, where there is one."""
    options = ctx.options
    count = options.projections
    verdict = judge(
        analytic, projected, ctx.tolerance(block, leaf), scale=terms.unsqueeze(0), extra=allowance
    )
    one_sided = (projected.forward, projected.backward, projected.value)
    sides = zip(*(part[0].tolist() for part in one_sided), strict=True)
    ctx.rough_projections += sum(rough_projection(f, b, d) for f, b, d in sides)
    wide_only = 0
    if wide is not None:
        wide_verdict = judge(wide, projected, ctx.screen_tolerance(), scale=terms.unsqueeze(0))
        analytic, verdict, only_wide = merge_wide(analytic, verdict, wide, wide_verdict)
        wide_only = int(only_wide.sum())
    status = pair_status(
        nonfinite=bool(verdict.nonfinite.any()),
        nondeterministic=nondet > options.nondet_tol,
        failed=bool(verdict.failed.any()),
        kinks=bool(verdict.kink.any()),
    )
    error = (analytic - projected.value).abs()
    finite = torch.isfinite(error)
    rel = error / projected.value.abs().clamp(min=1e-300)
    return PairReport(
        **pair_fields(block, leaf),
        check=Check.REVERSE,
        status=status,
        mode="fast",
        max_abs_error=float(error[finite].max()) if bool(finite.any()) else 0.0,
        max_rel_error=float(rel[finite].max()) if bool(finite.any()) else 0.0,
        max_error_ratio=float(verdict.ratio.max()),
        elements_checked=count,
        elements_failed=int(verdict.failed.sum()),
        kinks=int(verdict.kink.sum()),
        nondeterminism=nondet if options.check_nondeterminism else None,
        message=message(count, wide_only),
    )


def _recheck_in_full(
    ctx: Context, reports: list[PairReport], failing: list[tuple[int, int]]
) -> list[PairReport]:
    """Re-run failing pairs element by element so the report names the elements."""
    problem = ctx.problem
    entries = problem.n_outputs * sum(problem.leaves[i].size for _, i in failing)
    limit = ctx.options.max_jacobian_entries
    if limit is not None and entries > limit:
        ctx.note("fast mode found a mismatch; the full re-check is over the Jacobian size limit")
        return reports
    if entries > 16 * DENSE_ENTRIES:
        ctx.note("fast mode found a mismatch; the Jacobian is too large to re-check every element")
        return reports
    full = run_full(ctx, failing)
    by_pair = {(a.output.name, a.leaf.name): a.report() for key, a in full.items() if key[0] == Check.REVERSE}
    result = []
    for report in reports:
        replacement = by_pair.get((report.output, report.input))
        if replacement is not None:
            replacement.message = "fast-mode projections failed; re-checked in full"
            result.append(replacement)
        else:
            result.append(report)
    return result
