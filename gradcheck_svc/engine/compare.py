"""The verdict: tolerances from error bars, kinks, non-finite values, worst elements.

An element fails when ``|analytic - numeric| > atol + rtol * |numeric| + k * bar``.
A failing element is a *kink* when the two one-sided differences disagree
beyond their error bars and the analytic value lies between them (relu or abs
at 0, max with ties): the function is not differentiable there, so any value
of that interval is a valid subgradient. Accumulators stream over column
chunks so no pair ever needs its whole Jacobian in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradcheck_svc.engine.linearity import nonlinear_message
from gradcheck_svc.engine.numeric import SMOOTH_SPREAD, Central, Differences
from gradcheck_svc.engine.problem import Leaf, OutputBlock, flat_index
from gradcheck_svc.report import Check, ElementError, PairReport, Status

__all__ = [
    "ClearTest",
    "FarLeft",
    "Judgement",
    "PairAccumulator",
    "Ties",
    "Tolerance",
    "clear_passes",
    "judge",
    "merge_wide",
    "pair_fields",
    "pair_status",
    "reported_worst",
    "wide_only_message",
]

_KEEP_FULL = 4096  # pairs with at most this many entries keep their whole Jacobians
_MAP_BINS = 128  # error maps are max-pooled to at most this many bins per side
# Ranks of the worst-element list: failing elements first, then kinks, then the rest; by err/tol
# within a rank.
_FAILED, _KINK, _PASSED = 2, 1, 0
_KINK_BARS = 4.0  # one-sided error bars the two one-sided differences must be apart at a kink
# The backward differences over 2h, D-(2h) = (f(x) - f(x - 2h)) / 2h, of the elements at the given
# (row, column) positions of a judged block: a node the caller evaluates for those alone.
FarLeft = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
# Whether a tie of the inputs accounts for the failing element (row, column) of a judged block,
# given its error and tolerance (``ties.TieTest``): it is then a kink.
Ties = Callable[[int, int, float, float], bool]
_MAX_TIE_ELEMENTS = 32  # failing elements a block asks about; more is a wrong backward, not ties


@dataclass(frozen=True)
class Tolerance:
    atol: float | None  # None: relative to the block's largest |numeric|
    atol_factor: float
    rtol: float
    bars: float  # how many error bars are tolerated
    kinks_fail: bool
    slack: float = 0.0  # the accepted nondeterminism of the analytic side, added to atol


@dataclass
class Judgement:
    tolerance: torch.Tensor
    error: torch.Tensor  # |a - n| where both are finite, else 0
    ratio: torch.Tensor  # |a - n| / tolerance (inf where one side is non-finite)
    failed: torch.Tensor
    kink: torch.Tensor
    nonfinite: torch.Tensor
    clean: bool = False  # known to have no failed, kink or non-finite element (no need to count)


def _all_finite(*tensors: torch.Tensor) -> bool:
    # A sum propagates NaN and inf (inf - inf is NaN): one reduction per tensor, no mask.
    return all(bool(torch.isfinite(t.sum())) for t in tensors if t.numel())


def judge(
    analytic: torch.Tensor,
    diff: Differences,
    tol: Tolerance,
    scale: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    *,
    elements: bool = False,
    far_left: FarLeft | None = None,
    ties: Ties | None = None,
) -> Judgement:
    """Judge each element; ``scale`` (per element) replaces the block's largest |numeric| as
    the magnitude the relative atol applies to; ``extra`` (per element) adds to the tolerance.
    ``elements``: each entry is one Jacobian element with its own stencil (not a projection),
    so a kink inside the step can be told by the analytic value (``_kinks_within_step``).
    ``far_left``: the backward difference over ``2h`` of the elements it is given, for the few
    whose kink verdict needs it (``_left_curvature``); without it those keep the four nodes'.
    ``ties``: asked about the few elements that still fail (``_tied``)."""
    numeric = diff.value
    atol_extra = extra.nan_to_num(nan=0.0, posinf=0.0) if extra is not None else None
    if _all_finite(analytic, numeric, diff.bar, diff.one_sided_bar):
        return _judge_finite(analytic, diff, tol, scale, atol_extra, elements, far_left, ties)
    finite_a = torch.isfinite(analytic)
    finite_n = torch.isfinite(numeric)
    both_finite = finite_a & finite_n
    # Equal non-finite values on both sides (inf == inf, or NaN on both) are not a gradient bug.
    same_nonfinite = (~finite_a & ~finite_n) & ((analytic == numeric) | (analytic.isnan() & numeric.isnan()))
    nonfinite = ~both_finite & ~same_nonfinite
    zero = torch.zeros((), dtype=numeric.dtype)
    clean = Differences(
        *(
            torch.where(both_finite, torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), zero)
            for t in (numeric, diff.bar, diff.forward, diff.backward, diff.one_sided_bar)
        )
    )
    if scale is not None:
        scale = torch.where(both_finite, scale.nan_to_num(nan=0.0, posinf=0.0), zero)
    if atol_extra is not None:
        atol_extra = torch.where(both_finite, atol_extra, zero)
    verdict = _judge_finite(
        torch.where(both_finite, analytic, zero), clean, tol, scale, atol_extra, elements, far_left, ties
    )
    verdict.ratio = torch.where(nonfinite, float("inf"), verdict.ratio)
    verdict.failed |= nonfinite
    verdict.nonfinite = nonfinite
    return verdict


def _judge_finite(
    analytic: torch.Tensor,
    diff: Differences,
    tol: Tolerance,
    scale: torch.Tensor | None,
    extra: torch.Tensor | None,
    within_step: bool = False,
    far_left: FarLeft | None = None,
    ties: Ties | None = None,
) -> Judgement:
    """The verdict where every value is finite; in-place ops keep the passes over memory few."""
    numeric = diff.value
    atol: float | torch.Tensor
    if tol.atol is not None:
        atol = tol.atol
    elif scale is not None:
        atol = tol.atol_factor * scale
    else:
        block = torch.linalg.vector_norm(numeric, ord=float("inf")) if numeric.numel() else 0.0
        atol = float(tol.atol_factor * block)
    atol = atol + tol.slack
    tolerance = numeric.abs().mul_(tol.rtol).add_(diff.bar, alpha=tol.bars).add_(atol)
    if extra is not None:
        tolerance.add_(extra)
    error = torch.sub(analytic, numeric).abs_()
    # A zero tolerance (a block that is exactly zero, with no error bar) accepts only zero error:
    # err/tol is then 0 or infinite, never an artefact of dividing by the smallest float.
    ratio = torch.where(error == 0, 0.0, error / tolerance)
    failed = error > tolerance

    # A kink: the one-sided differences disagree far beyond their error bars (the central
    # difference and its bar mean nothing there) and the analytic value lies between them.
    # Candidates are rare, so the interval test runs on them alone.
    # On a smooth function the spread is twice the one-sided bar (both are h f''): the test
    # needs a margin well above 2 whatever error_bars the user chose for the verdict.
    kink_bars = max(tol.bars, _KINK_BARS)
    side_bar = diff.one_sided_bar * kink_bars
    spread = torch.sub(diff.forward, diff.backward).abs_()
    candidates = (spread > side_bar.mul_(2).add_(atol)).nonzero(as_tuple=True)
    kink = torch.zeros_like(failed)
    if candidates[0].numel():
        fwd, bwd, a = diff.forward[candidates], diff.backward[candidates], analytic[candidates]
        margin = diff.one_sided_bar[candidates] * kink_bars
        margin += atol[candidates] if isinstance(atol, torch.Tensor) else atol
        inside = (a >= torch.minimum(fwd, bwd) - margin) & (a <= torch.maximum(fwd, bwd) + margin)
        decided = within_step and far_left is not None
        if decided and not bool(inside.all()):
            # D- is off the left piece's derivative by that piece's own truncation, which no
            # margin above measures (D+(2h) is on the right): ``2h`` to the left measures it.
            out = (~inside).nonzero(as_tuple=True)[0]
            at = tuple(t[out] for t in candidates)
            assert far_left is not None
            bend = (far_left(at) - bwd[out]).abs_().mul_(kink_bars)
            wide = margin[out] + bend
            inside[out] = (a[out] >= torch.minimum(fwd[out], bwd[out]) - wide) & (
                a[out] <= torch.maximum(fwd[out], bwd[out]) + wide
            )
        kink[candidates] = inside
        if tol.kinks_fail:
            failed[candidates] |= inside
        elif decided:
            # One element's own stencil with a kink at the point: the one-sided differences are
            # each piece's derivative, and the Richardson value and its bar (which spans the
            # jump) mean nothing; a value beyond both pieces is no subgradient.
            failed[candidates] = ~inside
        else:
            failed[candidates] &= ~inside
    if within_step:
        left = _kinks_within_step(analytic, diff, tol, atol, failed, kink, far_left)
        if ties is not None and left is not None:
            _tied(ties, left, error, tolerance, tol, failed, kink)
    return Judgement(tolerance, error, ratio, failed, kink, torch.zeros_like(failed))


def _tied(
    ties: Ties,
    at: tuple[torch.Tensor, ...],
    error: torch.Tensor,
    tolerance: torch.Tensor,
    tol: Tolerance,
    failed: torch.Tensor,
    kink: torch.Tensor,
) -> None:
    """Failing elements ``at`` (no kink) a tie of the inputs accounts for (``ties.TieTest``):
    kinks (in place), failed only when kinks fail. Many failing elements are left as judged."""
    if not 0 < at[0].numel() <= _MAX_TIE_ELEMENTS:
        return
    for r, c in zip(at[0].tolist(), at[1].tolist(), strict=True):
        if ties(r, c, float(error[r, c]), float(tolerance[r, c])):
            kink[r, c] = True
            failed[r, c] = tol.kinks_fail


def _kinks_within_step(
    analytic: torch.Tensor,
    diff: Differences,
    tol: Tolerance,
    atol: float | torch.Tensor,
    failed: torch.Tensor,
    kink: torch.Tensor,
    far_left: FarLeft | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """Failing elements with a kink inside the step, between ``x`` and ``x + 2h``: marked as
    kinks (in place), failed only when kinks fail. Returns the failing elements that are not
    kinks (None when none failed).

    A kink at ``x + t h`` with ``0 < t < 1`` spoils ``D+`` and ``D+(2h)`` alike, so the kink test
    of ``judge`` (one-sided differences apart beyond ``|D+(2h) - D+(h)|``) misses it, and the
    Richardson value through it is wrong; yet ``x`` itself lies on a smooth piece whose
    derivative ``D-`` reads exactly. Four points cannot tell such a kink from a smooth curve
    bent at the scale of the step; the analytic value can: it sits on the one-sided difference
    of its own piece within noise, where a wrong one would agree only by coincidence. The
    noise is what the bar holds beyond the truncation ``|R - D|``, with ``D`` the mean of the
    one-sided differences (the nodes are symmetric about ``x``).

    On a smooth curve ``D+`` is off the derivative by its own truncation, about
    ``|D+(2h) - D+(h)|``, and ``D+ - D-`` is twice that: with the large steps of float32, a 1%
    error can land on ``D+`` exactly so. A kink between ``x - h`` and ``x`` leaves ``D+`` and
    ``D+(2h)`` on the clean piece, so ``D+``'s side is held to that truncation as well (the
    margin and the feature it must stand out from); ``D-`` has no second node to measure it.

    With ``far_left``, ``D-`` gets one (``_left_curvature``): elements whose analytic value lies
    on ``D-``'s side of the spread take ``x - 2h``, and a kink right of ``x`` is told from a bend.
    """
    at = (failed & ~kink).nonzero(as_tuple=True)
    if not at[0].numel():
        return None
    forward, backward, value = diff.forward[at], diff.backward[at], diff.value[at]
    noise = (diff.bar[at] - (value - (forward + backward) / 2).abs()).clamp_(min=0.0)
    a = analytic[at]
    floor = atol[at] if isinstance(atol, torch.Tensor) else atol
    margin = noise * _KINK_BARS + floor + tol.rtol * a.abs()
    plus_margin = margin + diff.one_sided_bar[at]
    spread = (forward - backward).abs()
    on_plus = ((a - forward).abs() <= plus_margin) & (spread > 2 * plus_margin)
    if far_left is None:
        on_minus = ((a - backward).abs() <= margin) & (spread > 2 * margin)
    else:
        on_minus = _left_curvature(a, forward, backward, margin, spread, at, far_left)
    within = on_minus | on_plus
    kink[at] = within
    if not tol.kinks_fail:
        failed[at] = ~within
    return tuple(t[~within] for t in at)


def _left_curvature(
    a: torch.Tensor,
    forward: torch.Tensor,
    backward: torch.Tensor,
    margin: torch.Tensor,
    spread: torch.Tensor,
    at: tuple[torch.Tensor, ...],
    far_left: FarLeft,
) -> torch.Tensor:
    """Which elements ``at`` have a kink between ``x`` and ``x + 2h`` and an analytic value on
    the left piece's derivative, told with the node ``x - 2h``.

    From ``x - 2h``, ``x - h`` and ``x`` the left piece's derivative reads to second order,
    ``L = 2 D- - D-(2h)``. A smooth curve bends as much on both sides: the central difference
    ``D`` is then within ``O(h^2)`` of ``L``, while a kink right of ``x`` puts it half the spread
    away (``D+`` alone carries the jump): a wrong value that merely landed on ``D-`` (a 1%
    error in float32, whose steps are large) is no longer taken for a kink. A correct value
    sits on ``D-`` within noise, or on ``L`` within noise and that estimate's truncation where
    the left piece bends. Only elements whose value is nearer ``D-`` than ``D+`` take the node.
    """
    near = (((a - backward).abs() <= (a - forward).abs()) & (spread > 2 * margin)).nonzero(as_tuple=True)[0]
    on_minus = torch.zeros_like(a, dtype=torch.bool)
    if not near.numel():
        return on_minus
    backward_2h = far_left(tuple(t[near] for t in at))
    b, s = backward[near], spread[near]
    left = 2 * b - backward_2h
    central = (forward[near] + b) / 2
    kinked = (central - left).abs() > s / 4
    m = margin[near]
    # On D- itself as before, now that a bend is ruled out; or on L, where the left piece bends
    # (D- is then off by that bend, more than noise), unless a second kink left of x spoils L.
    on_left = ((a[near] - b).abs() <= m) | ((a[near] - left).abs() <= m + (b - backward_2h).abs() / 4)
    on_minus[near] = kinked & on_left
    return on_minus


@dataclass
class ClearTest:
    """Which elements the central difference passes by a wide margin (see ``clear_passes``)."""

    clear: torch.Tensor  # (m, c) bool
    error: torch.Tensor  # |a - D|
    half: torch.Tensor  # half the tolerance, the noise part of the Richardson bar standing for the bar
    spread: torch.Tensor  # |D+ - D-|
    bars: float
    floor: float = 0.0  # the part of ``half`` every element has: half of atol and slack

    def verdict(self) -> Judgement:
        """The verdict of a block every element of which passed clearly, against D with the bars
        of ``Central.reported``: what ``judge`` gives there, without its passes over the block."""
        tolerance = self.half.mul_(2).add_(self.spread, alpha=self.bars * SMOOTH_SPREAD / 6)
        ratio = torch.div(self.error, tolerance)
        if not self.floor > 0:
            # A zero tolerance is possible only without a floor: 0 / 0 reads 0 there.
            ratio.masked_fill_(self.error == 0, 0.0)
        nothing = torch.zeros_like(self.clear)
        return Judgement(tolerance, self.error, ratio, nothing, nothing, nothing, clean=True)


def clear_passes(
    analytic: torch.Tensor, first: Central, tol: Tolerance, extra: torch.Tensor | None = None
) -> ClearTest | None:
    """Elements whose verdict the central difference D settles alone: a pass by a wide margin.

    The third node's Richardson value R is within its bar's truncation part T = |R - D| of D,
    and the tolerance grows by ``bars * T``: with ``bars >= 1 + rtol``,
    ``|a - D| <= atol + rtol |D| + bars * noise`` implies ``|a - R| <= tolerance(R)`` whatever
    T is. The test asks for half of that tolerance, a margin for what D stands in for (the
    block's largest |numeric| in atol, the noise floor's terms). Kinks are ruled out by
    ``first.smooth``; non-finite values are never clear. None when ``bars`` is too small for
    the argument: every element then takes the third node.
    """
    if tol.bars < 1.0 + tol.rtol:
        return None
    value = first.value
    atol: float
    if tol.atol is not None:
        atol = tol.atol
    else:
        atol = tol.atol_factor * _largest_magnitude(value) if value.numel() else 0.0
    if not math.isfinite(atol):
        atol = float("nan")  # a non-finite D in the block: nothing is clear
    half = first.magnitude.mul(tol.rtol / 2)
    half.addr_(first.sigma, first.noise_gain, alpha=tol.bars / 2).add_((atol + tol.slack) / 2)
    if extra is not None:
        half.add_(extra.nan_to_num(nan=0.0, posinf=0.0), alpha=0.5)
    error = torch.sub(analytic, value).abs_()
    clear = (error <= half).logical_and_(first.smooth)
    return ClearTest(clear, error, half, first.spread, tol.bars, (atol + tol.slack) / 2)


def _largest_magnitude(values: torch.Tensor) -> float:
    """max |v| (NaN when some v is NaN), from one min-max pass in memory order, no |v| copy."""
    if values.dim() == 2 and not values.is_contiguous() and values.T.is_contiguous():
        values = values.T
    low, high = torch.aminmax(values)
    low_f, high_f = float(low), float(high)
    if math.isnan(low_f) or math.isnan(high_f):
        return math.nan
    return max(-low_f, high_f)


def merge_wide(
    analytic: torch.Tensor, low: Judgement, wide_analytic: torch.Tensor, wide: Judgement
) -> tuple[torch.Tensor, Judgement, torch.Tensor]:
    """One verdict from the user's backward and its float64 run, both against float64 differences.

    An element fails when either fails. Where only the float64 run fails, that run's value and
    tolerance are the ones shown (the user's dtype rounded the error away). Returns the analytic
    values to show, the verdict, and the mask of elements only the float64 run failed.
    """
    only_wide = wide.failed & ~low.failed
    if not bool(only_wide.any()):
        low.failed |= wide.failed
        low.nonfinite |= wide.nonfinite
        return analytic, low, only_wide
    merged = Judgement(
        tolerance=torch.where(only_wide, wide.tolerance, low.tolerance),
        error=torch.where(only_wide, wide.error, low.error),
        ratio=torch.where(only_wide, wide.ratio, low.ratio),
        failed=low.failed | wide.failed,
        kink=low.kink | wide.kink,
        nonfinite=low.nonfinite | wide.nonfinite,
    )
    return torch.where(only_wide, wide_analytic, analytic), merged, only_wide


def _largest(values: torch.Tensor) -> float:
    """The largest element, reduced in memory order: blocks come as (m, c) views of (c, m)
    memory, which a full max reads several times slower through the transposed strides."""
    if values.dim() == 2 and not values.is_contiguous() and values.T.is_contiguous():
        values = values.T
    return float(values.max())


def pair_status(
    *, nonfinite: bool, nondeterministic: bool, failed: bool, kinks: bool, nonlinear: bool = False
) -> Status:
    """A pair's verdict from what its elements showed, the most serious first; a backward not
    linear in grad_output (``linearity``) fails whatever its elements showed."""
    if nonfinite:
        return Status.NONFINITE
    if nondeterministic:
        return Status.NONDETERMINISTIC
    if failed or nonlinear:
        return Status.FAIL
    if kinks:
        return Status.KINK
    return Status.PASS


def pair_fields(output: OutputBlock, leaf: Leaf) -> dict[str, object]:
    """The fields that name a pair in a PairReport."""
    return {
        "output": output.name,
        "input": leaf.name,
        "output_shape": list(output.shape),
        "input_shape": list(leaf.shape),
        "dtype": leaf.dtype_name,
    }


def reported_worst(
    ranked: list[tuple[int, float, ElementError]], *, failed: int, kinks: int
) -> list[ElementError]:
    """The worst elements a pair reports, from ``(rank, ratio, element)`` sorted worst first:
    the failing ones when there are any, else the kinks, else the closest call."""
    if failed:
        return [el for rank, _, el in ranked if rank == _FAILED]
    if kinks:
        return [el for rank, _, el in ranked if rank == _KINK]
    return [el for _, _, el in ranked[:1]]


@dataclass
class PairAccumulator:
    """Streams blocks of one (output, input) pair into a PairReport."""

    output: OutputBlock
    leaf: Leaf
    check: Check
    mode: str
    max_worst: int
    checked: int = 0
    failed: int = 0
    kinks: int = 0
    nonfinite: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ratio: float = 0.0
    nondeterminism: float | None = None
    nondeterministic: bool = False
    nonlinearity: float | None = None  # the backward's departure from linearity in grad_output
    wide_only: int = 0  # elements that failed only in the float64 run of the backward
    message: str = ""
    _worst: list[tuple[int, float, ElementError]] = field(default_factory=list)
    _full: dict[str, torch.Tensor] | None = None
    _map: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows, cols = self.output.size, self.leaf.size
        if rows * cols <= _KEEP_FULL:
            self._full = {k: torch.zeros(rows, cols, dtype=torch.float64) for k in ("a", "n", "b")}
        self._map = torch.zeros(min(rows, _MAP_BINS), min(cols, _MAP_BINS), dtype=torch.float64)

    def add(
        self,
        columns: torch.Tensor,
        analytic: torch.Tensor,
        diff: Differences,
        verdict: Judgement,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Add a block: ``rows`` (default all of the output) x ``columns`` (positions within the leaf).

        Reductions run where the block lives; only scalars and the few worst elements move.
        """
        device = diff.value.device
        rows = torch.arange(self.output.size, device=device) if rows is None else rows.to(device)
        self._add(rows, columns.to(device), analytic, diff, verdict, scattered=False)

    def add_entries(
        self,
        rows: torch.Tensor,
        columns: torch.Tensor,
        analytic: torch.Tensor,
        diff: Differences,
        verdict: Judgement,
    ) -> None:
        """Add scattered elements ``(rows[k], columns[k])``: every tensor is 1-D, one value per element.

        Column groups give one element per output row, which is no grid; the verdicts, counts and
        worst-element order are those of ``add``.
        """
        device = diff.value.device
        self._add(rows.to(device), columns.to(device), analytic, diff, verdict, scattered=True)

    def _add(
        self,
        rows: torch.Tensor,
        columns: torch.Tensor,
        analytic: torch.Tensor,
        diff: Differences,
        verdict: Judgement,
        *,
        scattered: bool,
    ) -> None:
        numeric, error, ratio, failed, kink = (
            diff.value,
            verdict.error,
            verdict.ratio,
            verdict.failed,
            verdict.kink,
        )

        self.checked += numeric.numel()
        n_failed = 0 if verdict.clean else int(failed.sum())
        self.failed += n_failed
        if not verdict.clean:
            self.kinks += int(kink.sum())
            self.nonfinite += int(verdict.nonfinite.sum())
        if not numeric.numel():
            return
        self.max_abs = max(self.max_abs, _largest(error))
        # Relative error only where it means something: a numeric value of exactly 0 has none
        # (error / 0 is inf or NaN there, masked; error 0 over a non-zero value is 0 already).
        # |e / n| is e / |n| bit for bit; a finite largest value means no n is 0 (e / 0 is inf
        # or NaN), so the mask is needed only when it is not.
        largest_rel = _largest(torch.div(error, numeric).abs_())
        if not math.isfinite(largest_rel):
            largest_rel = _largest(torch.div(error, numeric.abs()).masked_fill_(numeric == 0, 0.0))
        if math.isnan(largest_rel):  # a non-finite numeric value, whose error reads 0
            rel = torch.where((error == 0) | (numeric == 0), 0.0, error / numeric.abs())
            largest_rel = _largest(rel)
        self.max_rel = max(self.max_rel, largest_rel)
        self.max_ratio = max(self.max_ratio, _largest(ratio))

        if self._full is not None:
            grid = (
                (rows.cpu(), columns.cpu())
                if scattered
                else (rows.cpu().unsqueeze(1), columns.cpu().unsqueeze(0))
            )
            self._full["a"][grid] = analytic.detach().to("cpu", torch.float64)
            self._full["n"][grid] = numeric.detach().to("cpu", torch.float64)
            self._full["b"][grid] = diff.bar.detach().to("cpu", torch.float64)

        if n_failed and self._map is not None:
            # The error map is kept for failing pairs only, so only blocks with failures draw on it.
            bins_r, bins_c = self._map.shape
            rb = rows * bins_r // self.output.size
            cb = columns * bins_c // self.leaf.size
            index = (
                (rb * bins_c + cb if scattered else rb.unsqueeze(1) * bins_c + cb.unsqueeze(0))
                .reshape(-1)
                .cpu()
            )
            pooled = ratio.reshape(-1).clamp(max=1e300).to("cpu", torch.float64)
            self._map.view(-1).scatter_reduce_(0, index, pooled, "amax")

        # Keep the worst elements: failing ones first, then kinks, then the rest, by err/tol.
        rank = None
        if n_failed or (not verdict.clean and bool(kink.any())):
            rank = torch.where(failed, _FAILED, torch.where(kink, _KINK, _PASSED))
        for level in (_FAILED, _KINK, _PASSED) if rank is not None else (_PASSED,):
            if rank is None:
                key, count = ratio, ratio.numel()
            else:
                chosen = rank == level
                key, count = torch.where(chosen, ratio, -1.0), int(chosen.sum())
            if count:
                # Blocks come as (m, c) views of (c, m) memory: flattened in that order, no copy.
                by_column = not scattered and key.dim() == 2 and key.T.is_contiguous()
                flat = key.T.reshape(-1) if by_column else key.reshape(-1)
                top = torch.topk(flat, min(self.max_worst, count)).indices
                if scattered:
                    at: tuple[torch.Tensor, ...] = (top,)
                    out_rows, in_cols = rows[top], columns[top]
                else:
                    height, width = key.shape
                    at = (top % height, top // height) if by_column else (top // width, top % width)
                    out_rows, in_cols = rows[at[0]], columns[at[1]]
                self._keep(level, at, out_rows, in_cols, analytic, diff, verdict)
        self._worst.sort(key=lambda item: (-item[0], -item[1]))
        del self._worst[self.max_worst :]

    def _keep(
        self,
        rank: int,
        at: tuple[torch.Tensor, ...],
        out_rows: torch.Tensor,
        in_cols: torch.Tensor,
        analytic: torch.Tensor,
        diff: Differences,
        verdict: Judgement,
    ) -> None:
        """Add the elements at index ``at`` of a block (output rows ``out_rows``, leaf positions
        ``in_cols``) to the worst-element list."""
        picked = {
            name: t[at].tolist()
            for name, t in (
                ("a", analytic),
                ("n", diff.value),
                ("b", diff.bar),
                ("t", verdict.tolerance),
                ("k", verdict.kink),
                ("r", verdict.ratio),
            )
        }
        rows_list, cols_list = out_rows.tolist(), in_cols.tolist()
        for j in range(len(rows_list)):
            out_index, out_part = flat_index(rows_list[j], self.output.shape, self.output.is_complex)
            in_index, in_part = flat_index(cols_list[j], self.leaf.shape, self.leaf.is_complex)
            element = ElementError(
                output_index=out_index,
                input_index=in_index,
                output_part=out_part,
                input_part=in_part,
                analytic=picked["a"][j],
                numeric=picked["n"][j],
                error_bar=picked["b"][j],
                tolerance=picked["t"][j],
                kink=bool(picked["k"][j]),
            )
            self._worst.append((rank, picked["r"][j], element))

    def record_nondeterminism(self, delta: float, tolerance: float) -> None:
        """The largest difference between two backward runs, and whether it is too large."""
        self.nondeterminism = delta
        self.nondeterministic = delta > tolerance

    def record_rerun(self, nondeterminism: float, nonlinearity: float | None, tolerance: float) -> None:
        """``record_nondeterminism``, and a backward found not linear in grad_output (``linearity``)."""
        self.record_nondeterminism(nondeterminism, tolerance)
        if nonlinearity is not None:
            self.nonlinearity = nonlinearity
            self.message = nonlinear_message(nonlinearity)

    @property
    def status(self) -> Status:
        return pair_status(
            nonfinite=bool(self.nonfinite),
            nondeterministic=self.nondeterministic,
            failed=bool(self.failed),
            kinks=bool(self.kinks),
            nonlinear=self.nonlinearity is not None,
        )

    def report(self) -> PairReport:
        status = self.status
        full = self._full
        error_map = None
        if status.failed and self._map is not None:
            error_map = [[float(v) for v in row] for row in self._map.tolist()]
        worst = reported_worst(self._worst, failed=self.failed, kinks=self.kinks)
        return PairReport(
            **pair_fields(self.output, self.leaf),
            check=self.check,
            status=status,
            mode=self.mode,
            max_abs_error=self.max_abs,
            max_rel_error=self.max_rel,
            max_error_ratio=self.max_ratio,
            elements_checked=self.checked,
            elements_failed=self.failed,
            kinks=self.kinks,
            worst=worst,
            analytic=full["a"].reshape(-1).tolist() if full is not None else None,
            numeric=full["n"].reshape(-1).tolist() if full is not None else None,
            error_bars=full["b"].reshape(-1).tolist() if full is not None else None,
            nondeterminism=self.nondeterminism,
            error_map=error_map,
            message=self.message or self.wide_only_message(self.wide_only),
        )

    def wide_only_message(self, count: int) -> str:
        return wide_only_message(self.leaf, count)


def wide_only_message(leaf: Leaf, count: int) -> str:
    """Why a failing element's analytic value is not the one the user's dtype computed."""
    if not count:
        return ""
    return (
        f"{count} element(s) fail only in the float64 run of this backward (values shown): "
        f"{leaf.dtype_name} rounding hides the error there, it does not remove it"
    )
