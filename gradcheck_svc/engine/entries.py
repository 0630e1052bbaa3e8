"""Finite differences of listed (row, group) entries, for column groups and re-checked columns.

A group moves few rows of a sparse Jacobian: only the entries it moved, or that the analytic
pattern names, are differenced, one value per entry, with each row's noise (median and floor)
from its own moved entries as the dense block would give it. Columns re-checked one by one take
``x + 2h`` only where the central difference leaves a verdict in doubt (``adaptive_singles``),
as full mode's column chunks do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradcheck_svc.engine.compare import PairAccumulator, Tolerance
from gradcheck_svc.engine.numeric import (
    _FLOOR_ULPS,
    _KINK_BARS,
    _MIN_NOISE_SAMPLES,
    NODES,
    SMOOTH_SPREAD,
    Differences,
    _noise_gain,
    derivative_weights,
    noise_sample,
    perturb,
)

if TYPE_CHECKING:  # only the type: this module stays free of the driver's imports at run time
    from gradcheck_svc.engine.context import Context

__all__ = ["Listing", "Nodes", "adaptive_singles", "entry_differences"]


@dataclass
class Nodes:
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
class Listing:
    """The (row, group) entries a group moved or the analytic pattern names, sorted row-major."""

    keys: torch.Tensor  # row * k + group
    rows_of: torch.Tensor
    groups_of: torch.Tensor
    is_known: torch.Tensor  # the analytic pattern names the entry
    column_of: torch.Tensor  # the column it names there (-1 elsewhere)
    is_moved: torch.Tensor  # some node moved the entry's row

    @classmethod
    def of(cls, moved: torch.Tensor, known_key: torch.Tensor, known_cols: torch.Tensor, k: int) -> Listing:
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


def adaptive_singles(
    ctx: Context,
    index: int,
    jac_t: torch.Tensor,
    accumulators: list[tuple[slice, PairAccumulator, Tolerance]],
    columns: torch.Tensor,
    step: torch.Tensor,
    x_scale: torch.Tensor,
    known: tuple[torch.Tensor, torch.Tensor],
) -> tuple[Nodes, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    nodes = Nodes(pair, plus2, slot, f0)
    moved = (pair != f0).any(dim=0)
    moved[picked] |= plus2 != f0
    listing = Listing.of(moved, known[0], known[1], k)
    rows, groups = listing.rows_of, listing.groups_of
    offsets = torch.tensor(NODES, dtype=torch.float64, device=device).unsqueeze(1).expand(3, k)
    first = entry_central(nodes, f0, offsets, rows, groups, x_scale, ctx.numeric_machine_eps, picked)
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
        nodes = Nodes(pair, torch.cat([plus2, third]), slot, f0)
    return nodes, moved, ~doubtful, first.sigma


@dataclass
class EntryCentral:
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


def entry_central(
    nodes: Nodes,
    f0: torch.Tensor,
    offsets: torch.Tensor,
    rows: torch.Tensor,
    groups: torch.Tensor,
    x_scale: torch.Tensor,
    machine_eps: float,
    picked: torch.Tensor,
) -> EntryCentral:
    """``numeric.central`` of the listed entries (``offsets`` ``(3, k)`` per group), their noise
    from the sample ``picked`` (which took ``x + 2h``) and the floor over every entry's |D|."""
    m = f0.numel()
    fr = f0[rows]
    d_minus = fr - nodes.at(0, groups, rows)
    d_plus = nodes.at(1, groups, rows) - fr
    t_minus, t_plus = offsets[0][groups], offsets[1][groups]
    value = torch.add(d_plus, d_minus).div_(t_plus - t_minus)
    spread = (d_plus / t_plus).add_(d_minus / t_minus).abs_()
    median = entry_median(nodes, fr, offsets, rows, groups, picked, m)
    terms = torch.zeros(m, dtype=torch.float64, device=rows.device).index_add_(
        0, rows, value.abs() * x_scale[groups]
    )
    sigma = floor_with(median, f0, terms, machine_eps)
    noise_gain = _noise_gain(offsets[0], offsets[1], offsets[2])[groups]
    side_gain = 1.5 * (2**0.5) / t_plus
    limit = value.abs().mul_(SMOOTH_SPREAD).add_(sigma[rows] * side_gain, alpha=2 * _KINK_BARS)
    return EntryCentral(value, spread, spread <= limit, sigma[rows] * noise_gain, sigma)


def entry_median(
    nodes: Nodes,
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
    w_minus, w_plus, w_plus2 = (w[s_groups] for w in derivative_weights(offsets[0], offsets[1], offsets[2]))
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


def floor_with(
    median: torch.Tensor | None, f0: torch.Tensor, terms: torch.Tensor, machine_eps: float
) -> torch.Tensor:
    """The floor of row_noise from a row's terms |J_ij| |x_j|, and the median above it."""
    terms = torch.nan_to_num(terms, nan=0.0, posinf=0.0)
    floor = _FLOOR_ULPS * machine_eps * (torch.nan_to_num(f0.abs(), nan=0.0, posinf=0.0) + terms)
    return floor if median is None else torch.maximum(median, floor)


def entry_differences(
    nodes: Nodes,
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
    w_minus, w_plus, w_plus2 = (w[groups] for w in derivative_weights(t_minus, t_plus, t_plus2))
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
    median = entry_median(nodes, fr, offsets, rows, groups, noise_sample(k).to(device), m)
    # The floor of row_noise: a few ulps of f(x) and of the terms |J_ij| |x_j| of the row.
    central = None if central_only is None else central_only[groups]
    magnitude = richardson.abs()
    if central is not None:
        value = torch.add(d_plus, d_minus).div_(t_plus[groups] - t_minus[groups])
        magnitude = torch.where(central, value.abs(), magnitude)
    terms = torch.zeros(m, dtype=torch.float64, device=device).index_add_(
        0, rows, magnitude * x_scale[groups]
    )
    sigma = floor_with(median, f0, terms, machine_eps)[rows]
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
