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
from gradcheck_svc.engine.entries import Listing, Nodes, adaptive_singles, entry_differences
from gradcheck_svc.engine.far_left import far_left_of_groups, tied_entries
from gradcheck_svc.engine.numeric import NODES, Differences, Probes, differences, perturb, steps

if TYPE_CHECKING:  # only the type: this module stays free of the driver's imports at run time
    from gradcheck_svc.engine.context import Context

__all__ = ["ColouredLeaf", "colour_by_stride", "plan_groups", "run_coloured"]

_MAX_TRIES = 48  # strides tried after the lower bound (the densest row)
_COUNTED_KEYS = 1 << 22  # stride keys up to this many are told apart by counting, not sorting
_MIN_GAIN = 3  # colour only when it saves at least this factor in evaluations
_WEIGHT_BITS = 7  # weights (2^7 + r) / 2^8: few bits keep x + t * w * h exact
# Re-checked columns, from this many in one call, take x + 2h only where the central difference
# leaves the verdict in doubt (as full mode's column chunks of that size do).
_ADAPTIVE_SINGLES = 256
# Memory of one batch of columns re-checked with three nodes at once (copies in, outputs out):
# every pass over it is a pass over memory, and a batch that stays in the cache makes each one
# cheap; a few more Python calls cost less than passes over a batch ten times the cache. Not for
# the x + 2h where in doubt: each call's noise sample takes x + 2h, so it wants few, large calls.
_SINGLES_BYTES = 16 * 2**20
_MIN_SINGLES = 128  # ... but never fewer columns per call than this
# Failing groups whose columns span at most this many Jacobian entries are handed back to full
# mode's column chunks: a dense block that small costs a few vectorised passes, less than the
# sorting and searching that listing its entries takes (the listing pays off on large, sparse
# blocks). Either way each column is perturbed on its own, so the elements are exact.
_DENSE_RECHECK = 1 << 18


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
    n_rows = int(rows.max()) + 1
    for k in range(max(1, degree), min(limit, degree + _MAX_TRIES) + 1):
        keys = rows * k + cols % k
        if n_rows * k <= _COUNTED_KEYS:  # a count per key: one pass, where sorting takes many
            distinct = bool(torch.bincount(keys, minlength=n_rows * k).max() <= 1)
        else:
            distinct = torch.unique(keys).numel() == keys.numel()
        if distinct:
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
    """Check leaf ``index`` by groups; return the columns still to be perturbed by full mode
    (with the columns of failing groups, when they span a small block: ``_DENSE_RECHECK``).

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
    suspect = torch.zeros(leaf.size, dtype=torch.bool, device=device)  # columns of failing entries
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
            suspect=suspect,
        )
    if bool(failed_groups.any()):
        ctx.note("a column group disagreed with the analytic pattern; its columns were re-checked one by one")
        # Each column of a failing group on its own: every row it moves reads that column's
        # element, so what is recorded is exact, and rows the analytic side misses are named.
        again = plan.columns[failed_groups[plan.group]]
        if again.numel() * ctx.numeric_f0.numel() <= _DENSE_RECHECK:
            return torch.sort(torch.cat([left, again])).values
        position = torch.full((leaf.size,), -1, dtype=torch.long, device=device)
        # x + 2h only where in doubt pays when few columns are: those of entries the groups
        # failed foretell how many (all of them, when the backward is wrong everywhere).
        mostly_right = 2 * int(suspect[again].sum()) <= again.numel()
        singles = per_call if mostly_right else _singles_per_call(ctx, leaf.size, again.numel(), per_call)
        for c0 in range(0, again.numel(), singles):
            ctx.poll()
            cols = again[c0 : c0 + singles]
            few_suspects = 2 * int(suspect[cols].sum()) <= cols.numel()
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
                adaptive=few_suspects,
            )
            position[cols] = -1
    return left


def _singles_per_call(ctx: Context, n: int, count: int, per_call: int) -> int:
    """Columns per evaluation when ``count`` columns of an ``n``-element leaf are re-checked one
    by one with three nodes: batches within ``_SINGLES_BYTES`` (``per_call`` at most, never
    under ``_MIN_SINGLES``), of equal size."""
    per_column = 3 * max(8 * (n + ctx.numeric_f0.numel()), ctx.eval_bytes)
    size = min(per_call, max(_MIN_SINGLES, _SINGLES_BYTES // per_column))
    calls = max(1, count // size)
    return min(per_call, -(-count // calls))


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
    suspect: torch.Tensor | None = None,
    adaptive: bool = False,
) -> None:
    """Evaluate, verify and record ``k`` groups; marks the groups that must go column by column.

    With ``singletons`` every group is one column: nothing can hide, so every entry is recorded
    as it is judged, including rows the analytic side says the column does not reach; with
    ``adaptive`` too, ``x + 2h`` only where the central difference leaves a verdict in doubt.
    Groups mark in ``suspect`` the columns of the entries they failed.
    """
    leaf = ctx.numeric_problem.leaves[index]
    device = x.device
    offsets = torch.tensor(NODES, dtype=torch.float64, device=device).unsqueeze(1).expand(3, k).contiguous()
    f0 = ctx.numeric_f0
    pc, pr, pg = entries
    known_key, order = torch.sort(pr * k + pg)
    known_cols = pc[order]
    central_only: torch.Tensor | None = None  # singles reported on the central difference alone
    first_sigma: torch.Tensor | None = None
    evaluated: torch.Tensor | None = None  # the three nodes of every group, node-major
    if singletons and adaptive and directions is None and k >= _ADAPTIVE_SINGLES:
        nodes, moved, central_only, first_sigma = adaptive_singles(
            ctx, index, jac_t, accumulators, columns, step, x_scale, (known_key, known_cols)
        )
    else:
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
        three = evaluated.reshape(3, k, -1)
        nodes = Nodes(three[:2], three[2], torch.arange(k, device=device), f0)
        moved = (three != f0).any(dim=0)
    listing = Listing.of(moved, known_key, known_cols, k)
    keys, rows_of, groups_of = listing.keys, listing.rows_of, listing.groups_of
    if directions is None:
        diff = entry_differences(
            nodes,
            f0,
            offsets,
            rows_of,
            groups_of,
            x_scale,
            ctx.numeric_machine_eps,
            central_only=central_only,
            first_sigma=first_sigma,
        )
    else:  # low precision in its own dtype: the directions' samples join each row's noise
        assert evaluated is not None  # the adaptive singles run without directions
        dense = differences(evaluated, f0, offsets, ctx.numeric_machine_eps, x_scale, directions=directions)
        diff = Differences(*(t[rows_of, groups_of] for t in dense.parts()))
        del dense
    del evaluated, nodes
    is_known, column_of, is_moved = listing.is_known, listing.column_of, listing.is_moved

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
        left = far_left_of_groups(ctx, index, x, (columns, group, step), r_abs, g_known, per_step)
        tied = tied_entries(ctx, index, jac_t, j_known, r_abs) if singletons else None
        verdict = _flat(
            judge(analytic.unsqueeze(0), _as_row(element), tol, elements=True, far_left=left, ties=tied)
        )
        if not singletons:
            failing = verdict.failed | verdict.nonfinite
            failed_groups[g_known[failing]] = True
            if suspect is not None:
                suspect[j_known[failing]] = True
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
