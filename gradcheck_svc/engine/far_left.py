"""The node ``x - 2h``, evaluated only for the elements whose kink verdict asks for it.

The column path's stencil ``x - h, x, x + h, x + 2h`` measures the right piece's bend (``D+(2h)``)
but not the left one's; ``compare`` asks for ``D-(2h)`` of the few elements where that decides a
kink (``compare._left_curvature``). A passing check never asks, so it costs nothing there.
"""

from __future__ import annotations

import torch

from gradcheck_svc.engine.compare import FarLeft, Ties
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.numeric import backward_2h
from gradcheck_svc.engine.ties import TieTest

__all__ = ["far_left_of", "far_left_of_groups", "tied_entries", "ties_of"]


def far_left_of(ctx: Context, i: int, cols: torch.Tensor, h: torch.Tensor, rows: torch.Tensor) -> FarLeft:
    """``D-(2h)`` of elements ``(r, c)`` of a block whose rows are output rows ``rows`` of the
    numeric problem and whose columns are positions ``cols`` (steps ``h``) of leaf ``i``; each
    column is evaluated once, however many blocks and sides ask."""
    base = ctx.numeric_problem.leaves[i].real
    known: dict[int, torch.Tensor] = {}

    def far_left(at: tuple[torch.Tensor, ...]) -> torch.Tensor:
        r, c = at
        missing = sorted(set(c.tolist()) - known.keys())
        if missing:
            pick = torch.tensor(missing, dtype=torch.long, device=cols.device)
            values = backward_2h(
                lambda batch: ctx.evaluate(i, batch, columns=0), base, cols[pick], h[pick], ctx.numeric_f0
            )
            known.update(zip(missing, values, strict=True))
        return torch.stack([known[k][rows[j]] for j, k in zip(r.tolist(), c.tolist(), strict=True)])

    return far_left


def far_left_of_groups(
    ctx: Context,
    i: int,
    x: torch.Tensor,
    plan: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    groups: torch.Tensor,
    per_step: torch.Tensor,
) -> FarLeft:
    """``D-(2h)`` of grouped entries (``colouring``): entry ``p`` of a judged row is output row
    ``rows[p]`` moved by group ``groups[p]``, read per unit step ``per_step[p]`` as the groups'
    nominal nodes are; ``plan`` is ``(columns, group, step)``, each column's group and step.
    Each group's ``x - 2 direction`` is evaluated once."""
    columns, group, step = plan
    dtype = ctx.numeric_problem.leaves[i].real.dtype
    f0 = ctx.numeric_f0
    known: dict[int, torch.Tensor] = {}

    def far_left(at: tuple[torch.Tensor, ...]) -> torch.Tensor:
        p = at[-1]
        wanted = groups[p]
        missing = sorted(set(wanted.tolist()) - known.keys())
        if missing:
            chosen = torch.tensor(missing, dtype=torch.long, device=x.device)
            slot = torch.full((int(group.max()) + 1,), -1, dtype=torch.long, device=x.device)
            slot[chosen] = torch.arange(len(missing), device=x.device)
            moved = slot[group] >= 0
            direction = torch.zeros(len(missing), x.numel(), dtype=torch.float64, device=x.device)
            direction[slot[group[moved]], columns[moved]] = step[moved]
            values = ctx.evaluate(i, (x.to(torch.float64) - 2.0 * direction).to(dtype), columns=0)
            known.update(zip(missing, values, strict=True))
        values = torch.stack([known[g][r] for g, r in zip(wanted.tolist(), rows[p].tolist(), strict=True)])
        return torch.sub(f0[rows[p]], values).div_(2.0 * per_step[p])

    return far_left


def ties_of(ctx: Context, i: int, cols: torch.Tensor, rows: torch.Tensor, analytic: torch.Tensor) -> Ties:
    """The tie test (``ties.TieTest``) of a block whose rows are output rows ``rows`` and whose
    columns are positions ``cols`` of leaf ``i``, with the analytic columns ``analytic`` (c, M)
    of those positions; built on the first question, which a passing block never asks."""
    test: TieTest | None = None

    def tied(r: int, c: int, error: float, tolerance: float) -> bool:
        nonlocal test
        if test is None:
            where = {k: n for n, k in enumerate(cols.tolist())}

            def value(k: int, row: int) -> float | None:
                n = where.get(k)
                return None if n is None else float(analytic[n, row])

            test = TieTest(ctx, i, value)
        return test.explains(int(cols[c]), int(rows[r]), error, tolerance)

    return tied


def tied_entries(
    ctx: Context, i: int, jac_t: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor
) -> Ties:
    """The tie test of single-column entries (``colouring``): entry ``p`` of a judged row is the
    element ``(rows[p], columns[p])`` of leaf ``i``, whose transposed analytic Jacobian is
    ``jac_t`` (n, M)."""
    test: TieTest | None = None

    def tied(_: int, p: int, error: float, tolerance: float) -> bool:
        nonlocal test
        if test is None:
            test = TieTest(ctx, i, lambda k, r: float(jac_t[k, r]))
        return test.explains(int(columns[p]), int(rows[p]), error, tolerance)

    return tied
