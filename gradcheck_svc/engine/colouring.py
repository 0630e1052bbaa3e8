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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradcheck_svc.engine.compare import Judgement, PairAccumulator, Tolerance, judge
from gradcheck_svc.engine.numeric import (
    _FLOOR_ULPS,
    _KINK_BARS,
    _MIN_NOISE_SAMPLES,
    NODES,
    SMOOTH_SPREAD,
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
# Re-checked columns, from this many in one call, take x + 2h only where the central difference
# leaves the verdict in doubt (as full mode's column chunks of that size do).
_ADAPTIVE_SINGLES = 256


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
        position = torch.full((leaf.size,), -1, dtype=torch.long, device=device)
        for c0 in range(0, again.numel(), per_call):
            ctx.poll()
            cols = again[c0 : c0 + per_call]
            # x + 2h only where in doubt pays when few columns are: those of entries the groups
            # failed foretell how many (all of them, when the backward is wrong everywhere).
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
        nodes, moved, central_only, first_sigma = _adaptive_singles(
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
        nodes = _Nodes(three[:2], three[2], torch.arange(k, device=device), f0)
        moved = (three != f0).any(dim=0)
    listing = _Listing.of(moved, known_key, known_cols, k)
    keys, rows_of, groups_of = listing.keys, listing.rows_of, listing.groups_of
    if directions is None:
        diff = _entry_differences(
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
        verdict = _flat(judge(analytic.unsqueeze(0), _as_row(element), tol, elements=True))
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


@dataclass
class _Nodes:
    """Outputs of ``k`` groups at ``x - h`` and ``x + h`` (``pair``, ``(2, k, M)``) and at
    ``x + 2h`` for the groups that took it (row ``slot[g]`` of ``plus2``; -1: f(x) stands in)."""

    pair: torch.Tensor
    plus2: torch.Tensor
    slot: torch.Tensor
    f0: torch.Tensor

    def at(self, node: int, groups: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The outputs ``rows`` of ``groups`` at node ``node`` (0, 1, 2: ``NODES``' order)."""
        if node < 2:
            return self.pair[node, groups, rows]
        slot = self.slot[groups]
        if bool((slot >= 0).all()):
            return self.plus2[slot, rows]
        values = self.f0[rows].clone()
        taken = (slot >= 0).nonzero().squeeze(1)
        values[taken] = self.plus2[slot[taken], rows[taken]]
        return values


@dataclass
class _Listing:
    """The (row, group) entries a group moved or the analytic pattern names, sorted row-major."""

    keys: torch.Tensor  # row * k + group
    rows_of: torch.Tensor
    groups_of: torch.Tensor
    is_known: torch.Tensor  # the analytic pattern names the entry
    column_of: torch.Tensor  # the column it names there (-1 elsewhere)
    is_moved: torch.Tensor  # some node moved the entry's row

    @classmethod
    def of(cls, moved: torch.Tensor, known_key: torch.Tensor, known_cols: torch.Tensor, k: int) -> _Listing:
        """From ``moved`` ``(k, M)``: which rows each group moved at some node."""
        # Only the entries a group moved or the analytic pattern names are differenced: every other
        # entry reads 0 == 0 and records nothing, and adds nothing to a row's noise.
        moved_g, moved_r = moved.nonzero(as_tuple=True)
        moved_key = moved_r * k + moved_g
        keys = torch.unique(torch.cat([moved_key, known_key]))  # sorted: row-major, as nonzero() is
        device = keys.device
        known_at = torch.searchsorted(keys, known_key)
        is_known = torch.zeros(keys.numel(), dtype=torch.bool, device=device)
        is_known[known_at] = True
        column_of = torch.full((keys.numel(),), -1, dtype=torch.long, device=device)
        column_of[known_at] = known_cols
        is_moved = torch.zeros(keys.numel(), dtype=torch.bool, device=device)
        is_moved[torch.searchsorted(keys, moved_key)] = True
        return cls(keys, keys // k, keys % k, is_known, column_of, is_moved)

    def blocks(self, rows: slice, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries of output rows ``rows``: those the pattern names, and the moved others."""
        lo = int(torch.searchsorted(self.keys, rows.start * k))
        hi = int(torch.searchsorted(self.keys, rows.stop * k))
        block = torch.arange(lo, hi, device=self.keys.device)
        return block[self.is_known[lo:hi]], block[~self.is_known[lo:hi] & self.is_moved[lo:hi]]


def _adaptive_singles(
    ctx: Context,
    index: int,
    jac_t: torch.Tensor,
    accumulators: list[tuple[slice, PairAccumulator, Tolerance]],
    columns: torch.Tensor,
    step: torch.Tensor,
    x_scale: torch.Tensor,
    known: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-checked columns, each on its own: ``x - h`` and ``x + h`` for every one, ``x + 2h`` for
    the noise sample's (as full mode's column chunks take them) and then for the columns some
    entry of which the central difference does not pass by a wide margin.

    Returns the outputs at the nodes, which rows each column moved, which columns stand on the
    central difference, and each output's first-pass noise.
    """
    leaf = ctx.numeric_problem.leaves[index]
    f0 = ctx.numeric_f0
    k, m, device = columns.numel(), f0.numel(), columns.device
    picked = noise_sample(k).to(device)
    batch = perturb(
        leaf.real,
        [(NODES[0], columns, step), (NODES[1], columns, step), (NODES[2], columns[picked], step[picked])],
    )
    evaluated = ctx.evaluate(index, batch, columns=0)
    del batch
    slot = torch.full((k,), -1, dtype=torch.long, device=device)
    slot[picked] = torch.arange(picked.numel(), device=device)
    pair, plus2 = evaluated[: 2 * k].view(2, k, m), evaluated[2 * k :]
    nodes = _Nodes(pair, plus2, slot, f0)
    moved = (pair != f0).any(dim=0)
    moved[picked] |= plus2 != f0
    listing = _Listing.of(moved, known[0], known[1], k)
    rows, groups = listing.rows_of, listing.groups_of
    offsets = torch.tensor(NODES, dtype=torch.float64, device=device).unsqueeze(1).expand(3, k)
    first = _entry_central(nodes, f0, offsets, rows, groups, x_scale, ctx.numeric_machine_eps, picked)
    doubtful = torch.zeros(k, dtype=torch.bool, device=device)
    for block_rows, _, tol in accumulators:
        known_at, free_at = listing.blocks(block_rows, k)
        for at, analytic in (
            (known_at, jac_t[listing.column_of[known_at], rows[known_at]]),
            (free_at, None),
        ):
            if at.numel():
                clear = first.clear(at, analytic, step[groups[at]], tol)
                doubtful[groups[at][~clear]] = True
    extra = (doubtful & (slot < 0)).nonzero().squeeze(1)
    if extra.numel():
        third = ctx.evaluate(index, perturb(leaf.real, [(NODES[2], columns[extra], step[extra])]), columns=0)
        moved[extra] |= third != f0
        slot[extra] = torch.arange(picked.numel(), picked.numel() + extra.numel(), device=device)
        nodes = _Nodes(pair, torch.cat([plus2, third]), slot, f0)
    return nodes, moved, ~doubtful, first.sigma


@dataclass
class _EntryCentral:
    """The first pass of re-checked columns, per listed entry: D, |D+ - D-|, whether the step
    shows no feature (``numeric.central``'s ``smooth``), and each output's noise."""

    value: torch.Tensor
    spread: torch.Tensor
    smooth: torch.Tensor
    noise: torch.Tensor  # sigma of the entry's row times the Richardson value's gain
    sigma: torch.Tensor  # (M,)

    def clear(
        self, at: torch.Tensor, analytic: torch.Tensor | None, per_step: torch.Tensor, tol: Tolerance
    ) -> torch.Tensor:
        """Which entries ``at`` (of one judged block) D passes by a wide margin against
        ``analytic`` (zero where None), in element units: ``compare.clear_passes``' test."""
        if tol.bars < 1.0 + tol.rtol:
            return torch.zeros(at.numel(), dtype=torch.bool, device=at.device)
        value = self.value[at] / per_step
        if tol.atol is not None:
            atol = tol.atol
        else:
            largest = float(value.abs().max())
            atol = tol.atol_factor * largest if math.isfinite(largest) else math.nan
        half = value.abs().mul_(tol.rtol / 2)
        half.add_(self.noise[at] / per_step, alpha=tol.bars / 2).add_((atol + tol.slack) / 2)
        error = value.abs() if analytic is None else torch.sub(analytic, value).abs_()
        return (error <= half).logical_and_(self.smooth[at])


def _entry_central(
    nodes: _Nodes,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    groups: torch.Tensor,
    x_scale: torch.Tensor,
    machine_eps: float,
    picked: torch.Tensor,
) -> _EntryCentral:
    """``numeric.central`` of the listed entries (``offsets`` ``(3, k)`` per group), their noise
    from the sample ``picked`` (which took ``x + 2h``) and the floor over every entry's |D|."""
    m = f0.numel()
    fr = f0[rows]
    d_minus = fr - nodes.at(0, groups, rows)
    d_plus = nodes.at(1, groups, rows) - fr
    t_minus, t_plus = offsets[0][groups], offsets[1][groups]
    value = torch.add(d_plus, d_minus).div_(t_plus - t_minus)
    spread = (d_plus / t_plus).add_(d_minus / t_minus).abs_()
    median = _entry_median(nodes, fr, offsets, rows, groups, picked, m)
    terms = torch.zeros(m, dtype=torch.float64, device=rows.device).index_add_(
        0, rows, value.abs() * x_scale[groups]
    )
    sigma = _floor_with(median, f0, terms, machine_eps)
    noise_gain = _noise_gain(offsets[0], offsets[1], offsets[2])[groups]
    side_gain = 1.5 * (2**0.5) / t_plus
    limit = value.abs().mul_(SMOOTH_SPREAD).add_(sigma[rows] * side_gain, alpha=2 * _KINK_BARS)
    return _EntryCentral(value, spread, spread <= limit, sigma[rows] * noise_gain, sigma)


def _entry_median(
    nodes: _Nodes,
    fr: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    groups: torch.Tensor,
    picked: torch.Tensor,
    m: int,
) -> torch.Tensor | None:
    """Each output's median of R - D over the sampled groups that moved it, as _median_noise
    takes it (0 with fewer than a few); None without a sample."""
    if not picked.numel():
        return None
    device, k = rows.device, offsets.shape[1]
    slot = torch.full((k,), -1, dtype=torch.long, device=device)
    slot[picked] = torch.arange(picked.numel(), device=device)
    in_sample = (slot[groups] >= 0).nonzero().squeeze(1)
    s_rows, s_groups = rows[in_sample], groups[in_sample]
    d_minus = fr[in_sample] - nodes.at(0, s_groups, s_rows)
    d_plus = nodes.at(1, s_groups, s_rows) - fr[in_sample]
    d_plus2 = nodes.at(2, s_groups, s_rows) - fr[in_sample]
    moved = (d_plus != 0) | (d_minus != 0) | (d_plus2 != 0)
    w_minus, w_plus, w_plus2 = (w[s_groups] for w in _derivative_weights(offsets[0], offsets[1], offsets[2]))
    inv_span = (1.0 / (offsets[1] - offsets[0]))[s_groups]
    truncation = d_plus * (w_plus - inv_span)
    truncation.add_(d_minus * (-w_minus - inv_span)).add_(d_plus2 * w_plus2).abs_()
    keep = moved.nonzero().squeeze(1)
    s_rows, s_groups, truncation = s_rows[keep], s_groups[keep], truncation[keep]
    count = torch.zeros(m, dtype=torch.long, device=device).index_add_(0, s_rows, torch.ones_like(s_rows))
    median = torch.zeros(m, dtype=torch.float64, device=device)
    busy = (count >= _MIN_NOISE_SAMPLES).nonzero().squeeze(1)
    if busy.numel():
        rank = torch.full((m,), -1, dtype=torch.long, device=device)
        rank[busy] = torch.arange(busy.numel(), device=device)
        take = (rank[s_rows] >= 0).nonzero().squeeze(1)
        sample = truncation[take] * offsets[1][s_groups[take]]
        table = torch.full((busy.numel(), picked.numel()), torch.nan, dtype=torch.float64, device=device)
        table[rank[s_rows[take]], slot[s_groups[take]]] = torch.where(
            torch.isfinite(sample), sample, torch.nan
        )
        median[busy] = torch.nan_to_num(table.nanmedian(dim=1).values, nan=0.0) / 0.502
    return median


def _floor_with(
    median: torch.Tensor | None, f0: torch.Tensor, terms: torch.Tensor, machine_eps: float
) -> torch.Tensor:
    """The floor of row_noise from a row's terms |J_ij| |x_j|, and the median above it."""
    terms = torch.nan_to_num(terms, nan=0.0, posinf=0.0)
    floor = _FLOOR_ULPS * machine_eps * (torch.nan_to_num(f0.abs(), nan=0.0, posinf=0.0) + terms)
    return floor if median is None else torch.maximum(median, floor)


def _entry_differences(
    nodes: _Nodes,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    groups: torch.Tensor,
    x_scale: torch.Tensor,
    machine_eps: float,
    *,
    central_only: torch.Tensor | None = None,
    first_sigma: torch.Tensor | None = None,
) -> Differences:
    """``differences`` of the listed (row, group) entries alone, one value per entry.

    ``nodes`` are the outputs at the nodes. A row's noise depends only on the
    entries its groups moved (the others read exactly 0 and are left out of the median and
    the floor), so listing every moved entry gives each row the noise the whole block gives it.
    ``central_only`` (per group): groups without ``x + 2h``, whose entries are D with the bars
    of ``Central.reported`` and the first pass's noise ``first_sigma``; the floor of the others
    takes |D| there, as full mode's third-node columns take it (``redo_noise``).
    """
    k, m, device = nodes.pair.shape[1], f0.numel(), rows.device
    fr = f0[rows]
    d_minus = fr - nodes.at(0, groups, rows)  # f(x) - f(x - h)
    d_plus = nodes.at(1, groups, rows) - fr
    d_plus2 = nodes.at(2, groups, rows) - fr
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
    median = _entry_median(nodes, fr, offsets, rows, groups, noise_sample(k).to(device), m)
    # The floor of row_noise: a few ulps of f(x) and of the terms |J_ij| |x_j| of the row.
    central = None if central_only is None else central_only[groups]
    magnitude = richardson.abs()
    if central is not None:
        value = torch.add(d_plus, d_minus).div_(t_plus[groups] - t_minus[groups])
        magnitude = torch.where(central, value.abs(), magnitude)
    terms = torch.zeros(m, dtype=torch.float64, device=device).index_add_(
        0, rows, magnitude * x_scale[groups]
    )
    sigma = _floor_with(median, f0, terms, machine_eps)[rows]
    bar = truncation.add_(sigma * _noise_gain(t_minus, t_plus, t_plus2)[groups])
    one_sided_bar = one_sided.add_(sigma * (1.5 * (2**0.5) / h)[groups])
    if central is None or first_sigma is None or not bool(central.any()):
        return Differences(richardson, bar, forward, backward, one_sided_bar)
    # D with the bars a first pass reports (``Central.reported``, writable form).
    spread = (d_plus / t_plus[groups]).add_(d_minus / t_minus[groups]).abs_()
    first = first_sigma[rows]
    central_bar = (first * _noise_gain(t_minus, t_plus, t_plus2)[groups]).add_(
        spread, alpha=SMOOTH_SPREAD / 6
    )
    central_side = (first * (1.5 * (2**0.5) / h)[groups]).add_(spread, alpha=0.5)
    return Differences(
        torch.where(central, value, richardson),
        torch.where(central, central_bar, bar),
        torch.where(central, value, forward),
        torch.where(central, value, backward),
        torch.where(central, central_side, one_sided_bar),
    )


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
