"""Structure-aware finite differences: perturb columns that share no output row together.

Many Jacobians are diagonal or block-diagonal (activations, row-wise softmax or norms,
banded convolutions). Columns whose non-zeros fall in disjoint rows can be perturbed in
one direction (Curtis-Powell-Reid), so an elementwise function costs three evaluations
in all instead of three per element, and each row of the directional derivative still
reads one Jacobian element.

The grouping comes from the analytic Jacobian's non-zeros, which is exactly what is
under test, so it must not be able to hide its own error. Each column of a group is
moved by its own random weight, and every row of every group is compared, including the
rows the analytic side claims no column of the group reaches: a non-zero the analytic
side left out either lands in a row it says is unreached, or adds ``w_k J_ik`` to an
element it does know, and the random weights keep such terms from cancelling. Any group
with any failing, non-finite or unexplained entry is handed back to be perturbed column
by column, so every element the report names comes from its own column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradcheck_svc.engine.compare import Judgement, PairAccumulator, Tolerance, judge
from gradcheck_svc.engine.numeric import (
    _FLOOR_ULPS,
    _MIN_NOISE_SAMPLES,
    NODES,
    Differences,
    Probes,
    _derivative_weights,
    _noise_gain,
    differences,
    noise_sample,
    perturb,
    steps,
)

if TYPE_CHECKING:  # only the type: this module stays free of the driver's imports at run time
    from gradcheck_svc.engine.context import Context

__all__ = ["ColouredLeaf", "colour_by_stride", "plan_groups", "run_coloured"]

_MAX_TRIES = 48  # strides tried after the lower bound (the densest row)
_MIN_GAIN = 3  # colour only when it saves at least this factor in evaluations
_WEIGHT_BITS = 7  # weights (2^7 + r) / 2^8: few bits keep x + t * w * h exact


def colour_by_stride(rows: torch.Tensor, cols: torch.Tensor, n: int) -> int | None:
    """The smallest stride ``k`` such that columns ``j`` and ``j + k·m`` never share a row.

    ``rows``/``cols`` are the non-zeros of the pattern. Colour ``j mod k`` is a valid
    Curtis-Powell-Reid colouring exactly when no row holds two columns of one residue. Strides
    fit the layouts that matter (elementwise: 1; rows of length L: L; a band of width w: w);
    ``None`` when no stride up to a useful size works.
    """
    if rows.numel() == 0:
        return 1
    degree = int(torch.bincount(rows).max())
    limit = n // _MIN_GAIN
    for k in range(max(1, degree), min(limit, degree + _MAX_TRIES) + 1):
        keys = rows * k + cols % k
        if torch.unique(keys).numel() == keys.numel():
            return k
    return None


@dataclass
class ColouredLeaf:
    """Groups of one leaf: columns perturbed together, each with its own step."""

    columns: torch.Tensor  # (c,) the coloured columns
    group: torch.Tensor  # (c,) group of each column
    step: torch.Tensor  # (c,) its step along the group's direction: h_j * w_j (exact)
    n_groups: int


def plan_groups(
    base: torch.Tensor,
    h: torch.Tensor,
    entries: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
) -> tuple[ColouredLeaf, torch.Tensor] | None:
    """Colour the leaf's columns from the pattern's non-zeros ``(columns, rows)``; also return
    the columns left out.

    Columns whose moved values would round (so the step applied is not the step assumed)
    are left out, to be perturbed one by one. ``None`` when colouring would not pay.
    """
    n = base.numel()
    cols, rows = entries
    k = colour_by_stride(rows, cols, n)
    if k is None:
        return None
    levels = torch.randint(0, 2**_WEIGHT_BITS, (n,), generator=generator).to(torch.float64)
    weight = ((levels + 2**_WEIGHT_BITS) / 2 ** (_WEIGHT_BITS + 1)).to(base.device)
    step = h * weight
    x = base.detach().to(torch.float64)
    exact = torch.ones(n, dtype=torch.bool, device=base.device)
    for node in NODES:
        moved = (x + node * step).to(base.dtype).to(torch.float64)
        exact &= (moved - x) == node * step
    all_columns = torch.arange(n, device=base.device)
    kept = all_columns[exact]
    return ColouredLeaf(kept, kept % k, step[kept], k), all_columns[~exact]


def run_coloured(
    ctx: Context,
    index: int,
    jac_t: torch.Tensor,
    accumulators: list[tuple[slice, PairAccumulator, Tolerance]],
    *,
    directions: Probes | None = None,
) -> torch.Tensor | None:
    """Check leaf ``index`` by groups; return the columns still to be perturbed by full mode.

    ``jac_t`` is the analytic Jacobian of the leaf, transposed ``(n, M)``; ``accumulators``
    gives, per output block checked against this leaf, its rows, accumulator and tolerance.
    ``None`` means nothing was done (no useful colouring): every column is left.
    ``directions``: every output's noise samples along random directions
    (``numeric.probe_noise``), joined to each group's.
    """
    problem = ctx.numeric_problem
    leaf = problem.leaves[index]
    base = leaf.real
    if not bool(torch.isfinite(ctx.numeric_f0).all()):
        return None
    h = steps(base, ctx.eps(leaf))
    generator = torch.Generator().manual_seed(ctx.options.seed)
    pattern = jac_t != 0  # NaN and inf count as non-zeros
    # Counted per row before any index is listed: a dense Jacobian is turned away for the price of
    # one pass, not of listing its every entry.
    if pattern.numel() and int(pattern.sum(dim=0, dtype=torch.int32).max()) > leaf.size // _MIN_GAIN:
        return None  # a row needs more colours than would pay: dense, leave it to the column path
    pc, pr = pattern.nonzero(as_tuple=True)
    planned = plan_groups(base, h, (pc, pr), generator)
    if planned is None:
        return None
    plan, left = planned
    if plan.columns.numel() == 0:
        return None
    k = plan.n_groups
    device = base.device
    x = base.detach().to(torch.float64)
    group_of = torch.full((leaf.size,), -1, dtype=torch.long, device=device)
    group_of[plan.columns] = plan.group
    step_of = torch.zeros(leaf.size, dtype=torch.float64, device=device)
    step_of[plan.columns] = plan.step
    # Derivatives are per unit of the group parameter; the floor's |x| scale per unit is
    # max(|x_j|, h_j) / step_j, the largest over each group's columns.
    scale = torch.maximum(x[plan.columns].abs(), h[plan.columns]) / plan.step
    x_scale = torch.zeros(k, dtype=torch.float64, device=device).scatter_reduce_(
        0, plan.group, scale, "amax", include_self=True
    )
    # The pattern's entries in coloured columns, sorted by group so each chunk is one slice.
    keep = group_of[pc] >= 0
    pc, pr = pc[keep], pr[keep]
    order = torch.argsort(group_of[pc], stable=True)
    pc, pr = pc[order], pr[order]
    bounds = torch.searchsorted(group_of[pc], torch.arange(k + 1, device=device))

    per_call = ctx.chunk_size(leaf)  # groups per evaluation: the same memory as that many columns
    failed_groups = torch.zeros(k, dtype=torch.bool, device=device)
    for g0 in range(0, k, per_call):
        ctx.poll()
        g1 = min(k, g0 + per_call)
        in_chunk = (plan.group >= g0) & (plan.group < g1)
        lo, hi = int(bounds[g0]), int(bounds[g1])
        _check_groups(
            ctx,
            index,
            jac_t,
            accumulators,
            x,
            plan.columns[in_chunk],
            plan.group[in_chunk] - g0,
            plan.step[in_chunk],
            g1 - g0,
            x_scale[g0:g1],
            (pc[lo:hi], pr[lo:hi], group_of[pc[lo:hi]] - g0),
            step_of,
            failed_groups[g0:g1],
            directions=directions,
        )
    if bool(failed_groups.any()):
        ctx.note("a column group disagreed with the analytic pattern; its columns were re-checked one by one")
        # Each column of a failing group on its own: every row it moves reads that column's
        # element, so what is recorded is exact, and rows the analytic side misses are named.
        again = plan.columns[failed_groups[plan.group]]
        position = torch.full((leaf.size,), -1, dtype=torch.long, device=device)
        for c0 in range(0, again.numel(), per_call):
            ctx.poll()
            cols = again[c0 : c0 + per_call]
            position[cols] = torch.arange(cols.numel(), device=device)
            mine = position[pc] >= 0
            _check_groups(
                ctx,
                index,
                jac_t,
                accumulators,
                x,
                cols,
                torch.arange(cols.numel(), device=device),
                step_of[cols],
                cols.numel(),
                torch.maximum(x[cols].abs(), h[cols]) / step_of[cols],
                (pc[mine], pr[mine], position[pc[mine]]),
                step_of,
                torch.zeros(cols.numel(), dtype=torch.bool, device=device),
                singletons=True,
                directions=directions,
            )
            position[cols] = -1
    return left


def _check_groups(
    ctx: Context,
    index: int,
    jac_t: torch.Tensor,
    accumulators: list[tuple[slice, PairAccumulator, Tolerance]],
    x: torch.Tensor,
    columns: torch.Tensor,
    group: torch.Tensor,
    step: torch.Tensor,
    k: int,
    x_scale: torch.Tensor,
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    step_of: torch.Tensor,
    failed_groups: torch.Tensor,
    *,
    singletons: bool = False,
    directions: Probes | None = None,
) -> None:
    """Evaluate, verify and record ``k`` groups; marks the groups that must go column by column.

    With ``singletons`` every group is one column: nothing can hide, so every entry is recorded
    as it is judged, including rows the analytic side says the column does not reach.
    """
    leaf = ctx.numeric_problem.leaves[index]
    device = x.device
    if singletons:  # one column per group: copies of x with one element moved (as perturb does)
        batch = perturb(leaf.real, [(node, columns, step) for node in NODES])
    else:
        direction = torch.zeros(k, leaf.size, dtype=torch.float64, device=device)
        direction[group, columns] = step
        batch = torch.cat([(x + node * direction).to(leaf.real.dtype) for node in NODES])  # node-major
        del direction
    # Progress counts the columns a first pass covers; the column-by-column re-check of failing
    # groups goes over columns already counted.
    evaluated = ctx.evaluate(index, batch, columns=0 if singletons else columns.numel())
    del batch
    offsets = torch.tensor(NODES, dtype=torch.float64, device=device).unsqueeze(1).expand(3, k).contiguous()
    f0 = ctx.numeric_f0
    nodes = evaluated.reshape(3, k, -1)
    # Only the (row, group) entries a group moved or the analytic pattern names are differenced:
    # every other entry reads 0 == 0 and records nothing, and adds nothing to a row's noise.
    moved_g, moved_r = (nodes != f0).any(dim=0).nonzero(as_tuple=True)
    pc, pr, pg = entries
    known_key, order = torch.sort(pr * k + pg)
    moved_key = moved_r * k + moved_g
    keys = torch.unique(torch.cat([moved_key, known_key]))  # sorted: row-major, as nonzero() is
    rows_of, groups_of = keys // k, keys % k
    if directions is None:
        diff = _entry_differences(nodes, f0, offsets, rows_of, groups_of, x_scale, ctx.numeric_machine_eps)
    else:  # low precision in its own dtype: the directions' samples join each row's noise
        dense = differences(evaluated, f0, offsets, ctx.numeric_machine_eps, x_scale, directions=directions)
        diff = Differences(*(t[rows_of, groups_of] for t in dense.parts()))
        del dense
    del evaluated, nodes
    known_at = torch.searchsorted(keys, known_key)
    is_known = torch.zeros(keys.numel(), dtype=torch.bool, device=device)
    is_known[known_at] = True
    column_of = torch.full((keys.numel(),), -1, dtype=torch.long, device=device)
    column_of[known_at] = pc[order]
    is_moved = torch.zeros(keys.numel(), dtype=torch.bool, device=device)
    is_moved[torch.searchsorted(keys, moved_key)] = True

    verdicts = []
    for rows, acc, tol in accumulators:
        lo = int(torch.searchsorted(keys, rows.start * k))
        hi = int(torch.searchsorted(keys, rows.stop * k))
        block = torch.arange(lo, hi, device=device)
        known = block[is_known[lo:hi]]
        r_abs, g_known, j_known = rows_of[known], groups_of[known], column_of[known]
        r_known = r_abs - rows.start
        per_step = step_of[j_known]
        element = Differences(*(t[known] / per_step for t in diff.parts()))
        analytic = jac_t[j_known, r_abs]
        verdict = _flat(judge(analytic.unsqueeze(0), _as_row(element), tol, elements=True))
        if not singletons:
            failed_groups[g_known[verdict.failed | verdict.nonfinite]] = True
        verdicts.append((acc, r_known, j_known, g_known, analytic, element, verdict))

        # Rows the analytic side says no column of the group reaches, yet the group moved.
        free_at = block[~is_known[lo:hi] & is_moved[lo:hi]]
        if free_at.numel():
            r_free, g_free = rows_of[free_at] - rows.start, groups_of[free_at]
            free = Differences(*(t[free_at] for t in diff.parts()))
            if singletons:  # exact: the element (row, the group's one column), analytic zero
                free = Differences(*(t / step[g_free] for t in free.parts()))
            v_free = _flat(
                judge(torch.zeros_like(free.value).unsqueeze(0), _as_row(free), tol, elements=singletons)
            )
            if singletons:
                verdicts.append(
                    (acc, r_free, columns[g_free], g_free, torch.zeros_like(free.value), free, v_free)
                )
            else:
                failed_groups[g_free[v_free.failed | v_free.nonfinite | v_free.kink]] = True

    n_passed = int((~failed_groups[group]).sum())
    recorded: dict[int, int] = {}
    for acc, r_known, j_known, g_known, analytic, element, verdict in verdicts:
        ok = ~failed_groups[g_known]
        kept = element.rows(ok)
        acc.add_entries(r_known[ok], j_known[ok], analytic[ok], kept, _select(verdict, ok))
        recorded[id(acc)] = recorded.get(id(acc), 0) + int(ok.sum())
    for _, acc, _ in accumulators:
        # Entries the analytic side and the grouped differences both put at zero count as checked.
        acc.checked += acc.output.size * n_passed - recorded.get(id(acc), 0)


def _entry_differences(
    nodes: torch.Tensor,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    groups: torch.Tensor,
    x_scale: torch.Tensor,
    machine_eps: float,
) -> Differences:
    """``differences`` of the listed (row, group) entries alone, one value per entry.

    ``nodes`` are the outputs ``(3, k, M)`` at the nodes. A row's noise depends only on the
    entries its groups moved (the others read exactly 0 and are left out of the median and
    the floor), so listing every moved entry gives each row the noise the whole block gives it.
    """
    k, m, device = nodes.shape[1], f0.numel(), rows.device
    fr = f0[rows]
    d_minus = fr - nodes[0, groups, rows]  # f(x) - f(x - h)
    d_plus = nodes[1, groups, rows] - fr
    d_plus2 = nodes[2, groups, rows] - fr
    t_minus, t_plus, t_plus2 = offsets[0], offsets[1], offsets[2]
    w_minus, w_plus, w_plus2 = (w[groups] for w in _derivative_weights(t_minus, t_plus, t_plus2))
    richardson = d_plus * w_plus
    richardson.add_(d_minus * (-w_minus)).add_(d_plus2 * w_plus2)
    inv_span = (1.0 / (t_plus - t_minus))[groups]
    truncation = d_plus * (w_plus - inv_span)
    truncation.add_(d_minus * (-w_minus - inv_span)).add_(d_plus2 * w_plus2).abs_()
    forward = d_plus / t_plus[groups]
    backward = d_minus / (-t_minus[groups])
    one_sided = (d_plus2 / t_plus2[groups]).sub_(forward).abs_()

    # The median of R - D over the sampled groups that moved the row, as _median_noise takes it.
    h = offsets[1]
    picked = noise_sample(k).to(rows.device)
    median: torch.Tensor | None = None
    if picked.numel():
        slot = torch.full((k,), -1, dtype=torch.long, device=device)
        slot[picked] = torch.arange(picked.numel(), device=device)
        moved = (d_plus != 0) | (d_minus != 0) | (d_plus2 != 0)
        sampled = ((slot[groups] >= 0) & moved).nonzero().squeeze(1)
        s_rows = rows[sampled]
        count = torch.zeros(m, dtype=torch.long, device=device).index_add_(0, s_rows, torch.ones_like(s_rows))
        median = torch.zeros(m, dtype=torch.float64, device=device)
        busy = (count >= _MIN_NOISE_SAMPLES).nonzero().squeeze(1)
        if busy.numel():
            rank = torch.full((m,), -1, dtype=torch.long, device=device)
            rank[busy] = torch.arange(busy.numel(), device=device)
            take = sampled[rank[s_rows] >= 0]
            sample = truncation[take] * h[groups[take]]
            table = torch.full((busy.numel(), picked.numel()), torch.nan, dtype=torch.float64, device=device)
            table[rank[rows[take]], slot[groups[take]]] = torch.where(
                torch.isfinite(sample), sample, torch.nan
            )
            median[busy] = torch.nan_to_num(table.nanmedian(dim=1).values, nan=0.0) / 0.502
    # The floor of row_noise: a few ulps of f(x) and of the terms |J_ij| |x_j| of the row.
    terms = torch.zeros(m, dtype=torch.float64, device=device).index_add_(
        0, rows, richardson.abs() * x_scale[groups]
    )
    terms = torch.nan_to_num(terms, nan=0.0, posinf=0.0)
    floor = _FLOOR_ULPS * machine_eps * (torch.nan_to_num(f0.abs(), nan=0.0, posinf=0.0) + terms)
    sigma = (floor if median is None else torch.maximum(median, floor))[rows]
    bar = truncation.add_(sigma * _noise_gain(t_minus, t_plus, t_plus2)[groups])
    one_sided_bar = one_sided.add_(sigma * (1.5 * (2**0.5) / h)[groups])
    return Differences(richardson, bar, forward, backward, one_sided_bar)


def _flat(v: Judgement) -> Judgement:
    return _each(v, lambda t: t.squeeze(0))


def _select(v: Judgement, keep: torch.Tensor) -> Judgement:
    return _each(v, lambda t: t[keep])


def _each(v: Judgement, part: Callable[[torch.Tensor], torch.Tensor]) -> Judgement:
    """``v`` with ``part`` of each per-element tensor (its ``clean`` mark stays as it was)."""
    return Judgement(
        tolerance=part(v.tolerance),
        error=part(v.error),
        ratio=part(v.ratio),
        failed=part(v.failed),
        kink=part(v.kink),
        nonfinite=part(v.nonfinite),
        clean=v.clean,
    )


def _as_row(d: Differences) -> Differences:
    return Differences(*(t.unsqueeze(0) for t in d.parts()))
