"""The verdict: tolerances from error bars, kinks, non-finite values, worst elements.

An element fails when ``|analytic - numeric| > atol + rtol * |numeric| + k * bar``.
A failing element is a *kink* when the two one-sided differences disagree
beyond their error bars and the analytic value lies between them (relu or abs
at 0, max with ties): the function is not differentiable there, so any value
of that interval is a valid subgradient. Accumulators stream over column
chunks so no pair ever needs its whole Jacobian in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradcheck_svc.engine.numeric import Differences
from gradcheck_svc.engine.problem import Leaf, OutputBlock, flat_index
from gradcheck_svc.report import Check, ElementError, PairReport, Status

__all__ = ["Judgement", "PairAccumulator", "Tolerance", "judge"]

_KEEP_FULL = 4096  # pairs with at most this many entries keep their whole Jacobians
_MAP_BINS = 128  # error maps are max-pooled to at most this many bins per side


@dataclass(frozen=True)
class Tolerance:
    atol: float | None  # None: relative to the block's largest |numeric|
    atol_factor: float
    rtol: float
    bars: float  # how many error bars are tolerated
    kinks_fail: bool


@dataclass
class Judgement:
    tolerance: torch.Tensor
    ratio: torch.Tensor  # |a - n| / tolerance (inf where one side is non-finite)
    failed: torch.Tensor
    kink: torch.Tensor
    nonfinite: torch.Tensor


def judge(analytic: torch.Tensor, diff: Differences, tol: Tolerance) -> Judgement:
    numeric = diff.value
    finite_a = torch.isfinite(analytic)
    finite_n = torch.isfinite(numeric)
    both_finite = finite_a & finite_n
    # Equal non-finite values on both sides (inf == inf, or NaN on both) are not a gradient bug.
    same_nonfinite = (~finite_a & ~finite_n) & ((analytic == numeric) | (analytic.isnan() & numeric.isnan()))
    nonfinite = ~both_finite & ~same_nonfinite

    safe_n = torch.where(both_finite, numeric, torch.zeros_like(numeric))
    safe_a = torch.where(both_finite, analytic, torch.zeros_like(analytic))
    safe_bar = torch.where(
        both_finite, torch.nan_to_num(diff.bar, nan=0.0, posinf=0.0), torch.zeros_like(numeric)
    )
    if tol.atol is None:
        scale = safe_n.abs().max() if safe_n.numel() else torch.zeros((), dtype=safe_n.dtype)
        atol = tol.atol_factor * scale
    else:
        atol = torch.as_tensor(tol.atol, dtype=safe_n.dtype)
    tolerance = atol + tol.rtol * safe_n.abs() + tol.bars * safe_bar
    tolerance = torch.clamp(tolerance, min=torch.finfo(tolerance.dtype).tiny)
    error = (safe_a - safe_n).abs()
    ratio = torch.where(nonfinite, torch.full_like(error, float("inf")), error / tolerance)

    # A kink: the one-sided differences disagree far beyond their error bars (the central
    # difference and its bar mean nothing there) and the analytic value lies between them.
    side_bar = tol.bars * torch.nan_to_num(diff.one_sided_bar, nan=0.0, posinf=0.0)
    spread = (diff.forward - diff.backward).abs()
    low = torch.minimum(diff.forward, diff.backward) - side_bar - atol
    high = torch.maximum(diff.forward, diff.backward) + side_bar + atol
    kink = both_finite & (spread > 2 * side_bar + atol) & (safe_a >= low) & (safe_a <= high)
    failed = (error > tolerance) & both_finite & ~kink
    if tol.kinks_fail:
        failed = failed | kink
    return Judgement(tolerance, ratio, failed | nonfinite, kink, nonfinite)


@dataclass
class PairAccumulator:
    """Streams blocks of one (output, input) pair into a PairReport."""

    output: OutputBlock
    leaf: Leaf
    check: Check
    mode: str
    dtype: str
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
    message: str = ""
    _worst: list[tuple[float, ElementError]] = field(default_factory=list)
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
        """Add a block: ``rows`` (default all of the output) x ``columns`` (positions within the leaf)."""
        analytic = analytic.detach().to("cpu", torch.float64)
        numeric = diff.value.detach().to("cpu", torch.float64)
        bar = diff.bar.detach().to("cpu", torch.float64)
        ratio = verdict.ratio.detach().to("cpu")
        tolerance = verdict.tolerance.detach().to("cpu")
        failed = verdict.failed.detach().to("cpu")
        kink = verdict.kink.detach().to("cpu")
        columns = columns.detach().to("cpu")
        if rows is None:
            rows = torch.arange(self.output.size)
        rows = rows.to("cpu")

        self.checked += analytic.numel()
        self.failed += int(failed.sum())
        self.kinks += int(kink.sum())
        self.nonfinite += int(verdict.nonfinite.sum())
        finite = torch.isfinite(analytic) & torch.isfinite(numeric)
        error = torch.where(finite, (analytic - numeric).abs(), torch.zeros_like(numeric))
        if error.numel():
            self.max_abs = max(self.max_abs, float(error.max()))
            rel = error / numeric.abs().clamp(min=torch.finfo(torch.float64).tiny)
            rel = torch.where(error == 0, torch.zeros_like(rel), rel)
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.max_ratio = max(self.max_ratio, float(ratio.max()))

        if self._full is not None:
            grid = (rows.unsqueeze(1), columns.unsqueeze(0))
            self._full["a"][grid] = analytic
            self._full["n"][grid] = numeric
            self._full["b"][grid] = bar

        assert self._map is not None
        bins_r, bins_c = self._map.shape
        rb = rows * bins_r // self.output.size
        cb = columns * bins_c // self.leaf.size
        index = (rb.unsqueeze(1) * bins_c + cb.unsqueeze(0)).reshape(-1)
        self._map.view(-1).scatter_reduce_(0, index, ratio.reshape(-1).clamp(max=1e300), "amax")

        # Keep the worst elements: failing ones first, then by ratio.
        key = ratio + failed.to(ratio.dtype) * 1e300
        k = min(self.max_worst, key.numel())
        if k == 0:
            return
        top = torch.topk(key.reshape(-1), k).indices
        for flat in top.tolist():
            r, c = divmod(flat, analytic.shape[1])
            row, col = int(rows[r]), int(columns[c])
            out_index, out_part = flat_index(row, self.output.shape, self.output.is_complex)
            in_index, in_part = flat_index(col, self.leaf.shape, self.leaf.is_complex)
            element = ElementError(
                output_index=out_index,
                input_index=in_index,
                output_part=out_part,
                input_part=in_part,
                analytic=float(analytic[r, c]),
                numeric=float(numeric[r, c]),
                error_bar=float(bar[r, c]),
                tolerance=float(tolerance[r, c]),
                kink=bool(kink[r, c]),
            )
            self._worst.append((float(key[r, c]), element))
        self._worst.sort(key=lambda item: -item[0])
        del self._worst[self.max_worst :]

    @property
    def status(self) -> Status:
        if self.nonfinite:
            return Status.NONFINITE
        if self.nondeterministic:
            return Status.NONDETERMINISTIC
        if self.failed:
            return Status.FAIL
        if self.kinks:
            return Status.KINK
        return Status.PASS

    def report(self) -> PairReport:
        status = self.status
        full = self._full
        error_map = None
        if status.failed and self._map is not None:
            error_map = [[float(v) for v in row] for row in self._map.tolist()]
        worst = [el for _, el in self._worst]
        if status == Status.PASS:
            worst = worst[:1]
        return PairReport(
            output=self.output.name,
            input=self.leaf.name,
            check=self.check,
            status=status,
            mode=self.mode,
            output_shape=list(self.output.shape),
            input_shape=list(self.leaf.shape),
            dtype=self.dtype,
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
            message=self.message,
        )
