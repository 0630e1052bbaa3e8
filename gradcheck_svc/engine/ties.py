"""Ties: a failing element whose input equals other elements of its leaf, where f is not
differentiable though each partial derivative exists.

``topk([1, 1, 0.5, 1], 2)[1]``, the median of equal values, the middle of a sort: moving any one
of the tied inputs, up or down, leaves such an output where it is, so each one-sided difference
reads 0 and no kink shows along any axis; yet moving two of them together moves it. The partial
derivatives exist and are 0, but no linear map fits f there: autograd's value (the gradient of
one of the pieces that meet, here 1 for one of the tied inputs) is a valid subgradient, and no
value is "the" derivative. Such an element is a kink, not a failure, when

- the partials are not additive over the tie group (the derivative along all tied inputs moved
  together, ``D(sum e_k)``, differs from the sum of their partials by at least half the
  element's error: the non-differentiability accounts for the disagreement; on a smooth f they
  agree to ``O(h^2)``), and
- the analytic row summed over the group matches that derivative (moved together, the tied
  inputs keep their order, so f is smooth along that direction): a value given twice, dropped
  or scaled is still caught.

Central differences throughout, so that a smooth f's bend (``O(h)`` in one-sided differences)
cannot pass for either test. Only failing elements are examined, so a passing check costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.numeric import steps

__all__ = ["TieTest"]

_MAX_GROUP = 16  # tied inputs at most in one group (each costs two evaluations)


class TieTest:
    """The tie test of leaf ``i``'s elements; ``analytic(k, r)`` is the analytic ``d f_r / d x_k``
    (None where the caller does not hold it: the element then stays as judged)."""

    def __init__(self, ctx: Context, i: int, analytic: Callable[[int, int], float | None]) -> None:
        self.ctx, self.i, self.analytic = ctx, i, analytic
        leaf = ctx.numeric_problem.leaves[i]
        self.base = leaf.real.detach()
        self.x = self.base.to(torch.float64).reshape(-1)
        self.h = steps(self.x, ctx.eps(leaf))
        self.cache: dict[frozenset[int], torch.Tensor] = {}

    def explains(self, j: int, r: int, error: float, tolerance: float) -> bool:
        """Whether a tie at input ``j`` accounts for output ``r``'s failing element."""
        x = self.x
        if not bool(torch.isfinite(x[j])):
            return False
        tied = [k for k in (x == x[j]).nonzero().squeeze(1).tolist() if k != j]
        if not tied or len(tied) + 1 > _MAX_GROUP:
            return False
        group = [j, *tied]
        values = [self.analytic(k, r) for k in group]
        if any(v is None for v in values):
            return False
        together = float(self._central(frozenset(group))[r])
        partials = sum(float(self._central(frozenset((k,)))[r]) for k in group)
        if abs(together - partials) <= max(error / 2, tolerance * len(group)):
            return False
        return abs(sum(v for v in values if v is not None) - together) <= tolerance * len(group)

    def _central(self, moved: frozenset[int]) -> torch.Tensor:
        """The central difference of every output along the inputs ``moved`` together (one step,
        theirs: equal values have equal steps), from two evaluations, cached."""
        if moved not in self.cache:
            at = torch.tensor(sorted(moved), dtype=torch.long, device=self.x.device)
            h = self.h[at[0]]
            rows = self.base.reshape(-1).unsqueeze(0).repeat(2, 1)
            rows[0, at] = (self.x[at] + h).to(self.base.dtype)
            rows[1, at] = (self.x[at] - h).to(self.base.dtype)
            span = float(rows[0, at[0]].to(torch.float64) - rows[1, at[0]].to(torch.float64))
            values = self.ctx.evaluate(self.i, rows, columns=0).to(torch.float64)
            self.cache[moved] = (values[0] - values[1]) / span
        return self.cache[moved]
