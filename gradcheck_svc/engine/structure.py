"""The analytic Jacobian of block-structured functions from a few compressed backward passes.

Full mode takes the analytic Jacobian one output row at a time: M backward passes to learn, for
an elementwise function, M numbers. Most Jacobians people check have a structure their shapes
suggest, and this module hypothesises it per (output, leaf) pair, from shapes alone:

- *batch-leading*: the first ``k`` dims of the output and of the leaf are equal; row ``r`` reaches
  only the columns with the same leading-``k`` index (elementwise: ``k`` = ndim of equal shapes;
  row-wise softmax, sparsemax, norms: ``k`` = ndim - 1; logsumexp over the last dim: ``k`` = 1).
  Equal shapes do not tell elementwise from row-wise, so every ``k`` is a candidate, finest first.
- *broadcast parameter*: the leaf's shape is the output's trailing dims (a bias, a norm's weight);
  row ``r`` reaches only the column its trailing index names.

Rows that share no column under the hypothesis are summed into one cotangent with random weights
``u_r`` (uniform in [0.5, 1.5)), so one backward pass returns ``u_r J[r, c]`` for the one row ``r``
of the sum that the hypothesis lets reach ``c``. A non-zero where no row of the sum may reach is
caught at once (random weights: rows cannot cancel there).

A leaf whose backward reaches a column the hypothesis rules out goes to the next coarser one.
Otherwise a second pass sums each cotangent's rows with weight one: each entry is then that
row's own backward entry, bit for bit as the row-by-row path takes it (only exact zeros are
added to it), and a term of the backward outside the hypothesis that lands on a column another
row of the cotangent reaches is weighted differently in the two rebuilds, so they disagree.
When they agree, the Jacobian is the backward's own, and the leaf's column groups run exactly
as on the exact path (colouring.py, failing groups column by column): every element a report
names, its values and error bars, is the exact path's. A disagreement, a non-finite value in
the backward, a changed re-run, or no coarser hypothesis left, and everything this pass
recorded is dropped: the caller runs the exact path (dense rows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradcheck_svc.engine.agreement import largest_change, within
from gradcheck_svc.engine.compare import PairAccumulator
from gradcheck_svc.engine.numeric import defaults_for
from gradcheck_svc.report import Check

if TYPE_CHECKING:  # only the type: this module stays free of the driver's imports at run time
    from gradcheck_svc.engine.context import Context

__all__ = ["ENABLED", "PairStructure", "candidates", "run_structured"]

ENABLED = True  # off: full mode always takes the analytic Jacobian row by row
_MIN_GAIN = 3  # compress only when it saves at least this factor in backward passes
_MAX_ATTEMPTS = 4  # hypotheses tried (the failing leaf coarsened each time) before the exact path
_MAX_ENTRIES = 1 << 23  # hypothesised non-zeros held as index pairs
_AGREE_ULPS = 2.0**4  # the two rebuilds may differ by rounding: this many ulps of the values' scale

Pair = tuple[int, int]  # (output block index, leaf index)
Accumulators = Mapping[tuple[Check, int, int], PairAccumulator]


@dataclass(frozen=True)
class PairStructure:
    """A hypothesised pattern of one (output, leaf) pair: ``batch`` with ``k`` shared leading
    dims, or ``broadcast`` (the leaf is the output's trailing dims)."""

    kind: str
    k: int = 0


def candidates(out_shape: tuple[int, ...], leaf_shape: tuple[int, ...]) -> list[PairStructure]:
    """The hypotheses the shapes allow, finest first; empty when the pair may be dense."""
    shared = 0
    while shared < min(len(out_shape), len(leaf_shape)) and out_shape[shared] == leaf_shape[shared]:
        shared += 1
    found = [PairStructure("batch", k) for k in range(shared, 0, -1)]
    trailing = out_shape[len(out_shape) - len(leaf_shape) :]
    if 0 < len(leaf_shape) <= len(out_shape) and tuple(trailing) == tuple(leaf_shape) != tuple(out_shape):
        found.append(PairStructure("broadcast"))  # equal shapes: the same pattern as elementwise
    return found


@dataclass
class _LeafRows:
    """How the output rows of one leaf are summed into cotangents, and what each one reaches."""

    colour: torch.Tensor  # (M,) cotangent of each row, -1 where the leaf is not paired
    count: int
    rows: torch.Tensor  # (E,) hypothesised non-zeros (absolute row, leaf column)
    cols: torch.Tensor


def _leaf_rows(ctx: Context, i: int, chosen: Mapping[int, tuple[PairStructure, bool]]) -> _LeafRows:
    """Colour the rows of the outputs paired with leaf ``i`` so that rows of one colour share no
    column under the chosen hypotheses; outputs get disjoint colours (their rows may share one).

    ``split`` (per output) puts even and odd batches in separate cotangents: a backward that
    couples neighbouring batches then reaches a column no row of its cotangent may reach, which
    shows without any finite difference. Worth it while a coarser hypothesis is left to try, and
    always where it costs one pass more (one row per batch: elementwise).
    """
    problem = ctx.problem
    device = ctx.f0.device
    n = problem.leaves[i].size
    colour = torch.full((problem.n_outputs,), -1, dtype=torch.long, device=device)
    rows, cols = [], []
    base = 0
    for o in sorted(chosen):
        block, (s, split) = problem.outputs[o], chosen[o]
        r = torch.arange(block.size, device=device)
        if s.kind == "batch":
            batches = math.prod(block.shape[: s.k])
            per_row, per_col = block.size // batches, n // batches
            parts = 2 if (split or per_row == 1) and batches > 1 else 1  # one row per batch: 1 pass more
            colour[block.rows] = base + (r % per_row) * parts + (r // per_row) % parts
            count = per_row * parts
            b = torch.arange(batches, device=device).view(-1, 1, 1)
            rr = (b * per_row + torch.arange(per_row, device=device).view(1, -1, 1)).expand(-1, -1, per_col)
            cc = (b * per_col + torch.arange(per_col, device=device).view(1, 1, -1)).expand(-1, per_row, -1)
            rows.append(rr.reshape(-1) + block.offset)
            cols.append(cc.reshape(-1))
        else:  # broadcast: one column per row, its trailing index; a colour per leading index
            colour[block.rows] = base + r // n
            count = block.size // n
            rows.append(r + block.offset)
            cols.append(r % n)
        base += count
    return _LeafRows(colour, base, torch.cat(rows), torch.cat(cols))


def _applicable(ctx: Context, pairs: set[Pair]) -> bool:
    """Where grouped finite differences judge every element (colouring.py), and nothing is complex."""
    problem = ctx.problem
    leaves = {i for _, i in pairs}
    return (
        ctx.wide_analytic is None
        and not ctx.options.forward_ad
        and all(problem.outputs[o].size > 0 and not problem.outputs[o].is_complex for o, _ in pairs)
        and all(
            problem.leaves[i].size > 0
            and not problem.leaves[i].is_complex
            and bool(torch.isfinite(problem.leaves[i].real).all())
            for i in leaves
        )
        and bool(torch.isfinite(ctx.numeric_f0).all())
    )


Check_ = Callable[[list[Pair], dict[int, torch.Tensor]], Accumulators]
_EXACT = -1  # an attempt's answer for a leaf: only the exact path will do
_COARSER = -2  # an attempt's answer for a leaf: try its next hypothesis


class _Hypotheses:
    """Every pair's candidate hypotheses, the one each pair is at, and the row colourings they give."""

    def __init__(self, ctx: Context, pairs: set[Pair], options: dict[Pair, list[PairStructure]]) -> None:
        self.ctx = ctx
        self.pairs = pairs
        self.options = options
        self.level = dict.fromkeys(pairs, 0)
        self._made: dict[tuple[int, tuple[int, ...]], _LeafRows] = {}

    def _leaf(self, i: int, levels: Mapping[Pair, int]) -> _LeafRows:
        mine = sorted(p for p in self.pairs if p[1] == i)
        key = (i, tuple(levels[p] for p in mine))
        if key not in self._made:
            chosen = {p[0]: (self.options[p][levels[p]], levels[p] + 1 < len(self.options[p])) for p in mine}
            self._made[key] = _leaf_rows(self.ctx, i, chosen)
        return self._made[key]

    def plans(
        self, leaves: list[int], levels: Mapping[Pair, int] | None = None
    ) -> dict[int, _LeafRows] | None:
        """Each leaf's row colouring (at the current levels by default); ``None`` when it would not pay."""
        levels = self.level if levels is None else levels
        plans = {i: self._leaf(i, levels) for i in leaves}
        outputs = self.ctx.problem.outputs
        rows_today = sum(outputs[o].size for o in {o for o, i in self.pairs if i in plans})
        if _MIN_GAIN * sum(c.count for c in _distinct(plans)[0]) > rows_today:
            return None
        if sum(p.rows.numel() for p in plans.values()) > _MAX_ENTRIES:
            return None
        return plans

    def coarser(self, failing: list[int]) -> dict[Pair, int] | None:
        """The levels with the ``failing`` leaves one hypothesis coarser, when each has one that pays."""
        movable = {p for p in self.pairs if p[1] in failing and self.level[p] + 1 < len(self.options[p])}
        if {i for _, i in movable} != set(failing):
            return None
        levels = {p: self.level[p] + (p in movable) for p in self.pairs}
        return levels if self.plans(failing, levels) is not None else None


def run_structured(ctx: Context, pairs: set[Pair], check: Check_) -> Accumulators | None:
    """Check ``pairs`` with the analytic Jacobian taken by hypothesised structure.

    ``check(pairs, jac)`` judges the given pairs of one leaf, with its transposed analytic
    Jacobian ``(n_i, M)`` in ``jac``, against finite differences into fresh accumulators, as the
    exact path does. Leaves are independent: a leaf whose hypothesis held keeps its verdicts
    while another tries a coarser one. ``None``:
    the hypotheses did not apply or did not hold; nothing was recorded, and the caller takes the
    exact path.
    """
    if not ENABLED or not pairs or not _applicable(ctx, pairs):
        return None
    problem = ctx.problem
    options = {p: candidates(problem.outputs[p[0]].shape, problem.leaves[p[1]].shape) for p in pairs}
    if not all(options.values()):
        return None
    # Progress counts the columns of the path that answers: the exact one, if this one gives up.
    progress, ctx.progress = ctx.progress, None
    try:
        found = _search(ctx, _Hypotheses(ctx, pairs, options), check)
    finally:
        ctx.progress = progress
    if found is not None and progress is not None:
        progress.advance(sum(problem.leaves[i].size for i in {i for _, i in pairs}))
    return found


def _search(ctx: Context, hypotheses: _Hypotheses, check: Check_) -> Accumulators | None:
    """Attempts, each leaf that the backward refutes one hypothesis coarser than the last."""
    pending = sorted({i for _, i in hypotheses.pairs})
    done: dict[int, Accumulators] = {}
    started = time.perf_counter()
    tried = False
    for attempt in range(_MAX_ATTEMPTS):
        plans = hypotheses.plans(pending)
        if plans is None:
            break
        tried = True
        outcome = _attempt(
            ctx,
            hypotheses.pairs,
            plans,
            check,
            attempt,
            lambda failing: hypotheses.coarser(failing) is not None,
        )
        if any(v == _EXACT for v in outcome.values() if isinstance(v, int)):
            break
        done.update({i: v for i, v in outcome.items() if not isinstance(v, int)})
        pending = [i for i in pending if i not in done]
        if not pending:
            ctx.timed("structured_analytic_s", started)
            return {key: acc for i in sorted(done) for key, acc in done[i].items()}
        levels = hypotheses.coarser(pending)
        if levels is None:
            break  # a refuted leaf has no coarser hypothesis left that would pay
        hypotheses.level = levels
    if tried:
        ctx.note(
            "the block structure the shapes suggest did not hold for every input (or a group failed): "
            "the analytic Jacobian was taken row by row and checked exactly"
        )
        ctx.timed("structure_rejected_s", started)
    return None


def _distinct(plans: Mapping[int, _LeafRows]) -> tuple[list[_LeafRows], dict[int, int]]:
    """The row colourings of the leaves without repeats (leaves that share one share its passes),
    and the position of each leaf's colouring among them."""
    found: list[_LeafRows] = []
    which: dict[int, int] = {}
    for i, plan in plans.items():
        which[i] = next(
            (k for k, c in enumerate(found) if c.count == plan.count and torch.equal(c.colour, plan.colour)),
            len(found),
        )
        if which[i] == len(found):
            found.append(plan)
    return found, which


def _attempt(
    ctx: Context,
    pairs: set[Pair],
    plans: Mapping[int, _LeafRows],
    check: Check_,
    attempt: int,
    can_coarsen: Callable[[list[int]], bool],
) -> dict[int, Accumulators | int]:
    """One hypothesis per pending leaf; per leaf: its accumulators when the hypothesis held,
    ``_COARSER`` when it did not, ``_EXACT`` when only the exact path will do (a non-finite value
    in the backward, two rebuilds that disagree, a re-run of the backward that changed). Leaves
    the backward already refutes, with no coarser hypothesis to go to, end the attempt before
    any finite difference is taken."""
    problem = ctx.problem
    colourings, which = _distinct(plans)
    m = problem.n_outputs
    device = ctx.f0.device
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(ctx.options.seed + 1 + attempt)
    weight = (torch.rand(m, generator=generator, dtype=torch.float64) + 0.5).to(device)
    blocks, offsets = [], [0]
    for c in colourings:
        cot = torch.zeros(c.count, m, dtype=torch.float64, device=device)
        used = (c.colour >= 0).nonzero().squeeze(1)
        cot[c.colour[used], used] = weight[used]
        blocks.append(cot)
        offsets.append(offsets[-1] + c.count)
    cotangents = torch.cat(blocks)

    per_chunk = ctx.rows_per_backward(sum(problem.leaves[i].size for i in plans), cotangents.shape[0])
    grads: dict[int, list[torch.Tensor]] = {i: [] for i in plans}
    for c0 in range(0, cotangents.shape[0], per_chunk):
        ctx.poll()
        part = ctx.analytic.rows(cotangents[c0 : c0 + per_chunk])
        for i in plans:
            grads[i].append(part[i])
    outcome: dict[int, Accumulators | int] = {}
    jac: dict[int, torch.Tensor] = {}
    for i, plan in plans.items():
        g = torch.cat(grads[i])[offsets[which[i]] : offsets[which[i] + 1]]  # (count, n_i)
        if not bool(torch.isfinite(g).all()):
            outcome[i] = _EXACT
            continue
        colour = plan.colour[plan.rows]
        reached = torch.zeros_like(g, dtype=torch.bool)
        reached[colour, plan.cols] = True
        if bool((g[~reached] != 0).any()):
            outcome[i] = _COARSER  # the backward reaches a column the hypothesis rules out
            continue
        jac_i = torch.zeros(problem.leaves[i].size, m, dtype=torch.float64, device=device)
        jac_i[plan.cols, plan.rows] = g[colour, plan.cols] / weight[plan.rows]
        jac[i] = jac_i
    ctx.timed("analytic_s", start)
    refuted = [i for i, v in outcome.items() if isinstance(v, int) and v == _COARSER]
    if any(isinstance(v, int) and v == _EXACT for v in outcome.values()) or (
        refuted and not can_coarsen(refuted)
    ):
        return dict.fromkeys(plans, _EXACT)

    if not jac:
        return outcome  # every leaf refuted: each tries a coarser hypothesis
    # The elements must be exact: the rebuilt Jacobian, verified by a second pass, is the one
    # the row-by-row path takes, and the groups then run as they run there.
    started = time.perf_counter()
    exact = _verified(ctx, {i: plans[i] for i in jac}, jac)
    ctx.timed("analytic_s", started)
    if exact is None:
        return dict.fromkeys(plans, _EXACT)
    verified, delta = exact
    for i in verified:
        accumulators = check([p for p in sorted(pairs) if p[1] == i], {i: verified[i]})
        if ctx.options.check_nondeterminism:
            for (kind, _, _), acc in accumulators.items():
                if kind is Check.REVERSE:
                    acc.record_nondeterminism(delta[i], ctx.options.nondet_tol)
        outcome[i] = accumulators
    return outcome


def _verified(
    ctx: Context, plans: Mapping[int, _LeafRows], first: Mapping[int, torch.Tensor]
) -> tuple[dict[int, torch.Tensor], dict[int, float]] | None:
    """The Jacobians of ``plans``' leaves exactly as the row-by-row path takes them, or ``None``.

    A second pass sums the rows of each cotangent with weight one: where no two rows of a
    cotangent reach one column, each entry is that row's own backward entry, bit for bit (only
    exact zeros are added to it). A term the backward puts at a column that another row of the
    cotangent reaches would hide in both rebuilds, but weighted differently: the first pass's
    random weights give ``J[r, c] + (u_s / u_r) J[s, c]``, this one ``J[r, c] + J[s, c]``, so the
    two disagree unless the term is within rounding of nothing. Disagreement, a column no row may
    reach, a non-finite value, or a re-run of the first batch that changes beyond ``nondet_tol``:
    ``None``, and the caller takes the exact path. Also returns each leaf's re-run change.
    """
    problem = ctx.problem
    colourings, which = _distinct(plans)
    m = problem.n_outputs
    device = ctx.f0.device
    blocks, offsets = [], [0]
    for c in colourings:
        cot = torch.zeros(c.count, m, dtype=torch.float64, device=device)
        used = (c.colour >= 0).nonzero().squeeze(1)
        cot[c.colour[used], used] = 1.0
        blocks.append(cot)
        offsets.append(offsets[-1] + c.count)
    cotangents = torch.cat(blocks)
    per_chunk = ctx.rows_per_backward(sum(problem.leaves[i].size for i in plans), cotangents.shape[0])
    grads: dict[int, list[torch.Tensor]] = {i: [] for i in plans}
    head: list[torch.Tensor] = []
    for c0 in range(0, cotangents.shape[0], per_chunk):
        ctx.poll()
        part = ctx.analytic.rows(cotangents[c0 : c0 + per_chunk])
        head = head or part
        for i in plans:
            grads[i].append(part[i])
    dtypes = [o.dtype for o in problem.outputs] + [problem.leaves[i].dtype for i in plans]
    ulp = _AGREE_ULPS * defaults_for(*dtypes).machine_eps
    verified: dict[int, torch.Tensor] = {}
    for i, plan in plans.items():
        g = torch.cat(grads[i])[offsets[which[i]] : offsets[which[i] + 1]]  # (count, n_i)
        if not bool(torch.isfinite(g).all()):
            return None
        colour = plan.colour[plan.rows]
        reached = torch.zeros_like(g, dtype=torch.bool)
        reached[colour, plan.cols] = True
        if bool((g[~reached] != 0).any()):
            return None
        values = g[colour, plan.cols]
        weighted = first[i][plan.cols, plan.rows]
        scale = g.abs().amax(dim=1)[colour]  # the largest entry the cotangent gave
        if not within(values, weighted, ulp * (values.abs() + weighted.abs() + scale)):
            return None
        jac_i = torch.zeros(problem.leaves[i].size, m, dtype=torch.float64, device=device)
        jac_i[plan.cols, plan.rows] = values
        verified[i] = jac_i
    delta = dict.fromkeys(plans, 0.0)
    if ctx.options.check_nondeterminism:
        again = ctx.analytic.rows(cotangents[:per_chunk])
        delta = {i: largest_change(head[i], again[i]) for i in plans}
        if max(delta.values()) > ctx.options.nondet_tol:
            return None
    return verified, delta
