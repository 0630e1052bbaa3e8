"""The result of a check: pydantic models and their text rendering.

The same models travel everywhere: the engine builds them, the service converts
them to protobuf and back, the plugin prints them. ``str(report)`` is the
readable table a user sees; ``report.model_dump_json()`` round-trips through
``Report.model_validate_json``.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Check", "ElementError", "PairReport", "Report", "Status"]


class Status(str, Enum):
    """Verdict for one (output, input) pair, worst first when sorted by severity."""

    PASS = "pass"
    KINK = "kink"
    FAIL = "fail"
    NONDETERMINISTIC = "nondeterministic"
    NONFINITE = "nonfinite"

    @property
    def failed(self) -> bool:
        return self in (Status.FAIL, Status.NONDETERMINISTIC, Status.NONFINITE)


class Check(str, Enum):
    """Which two quantities a pair compares."""

    REVERSE = "reverse"  # reverse-mode (vjp) Jacobian vs finite differences
    FORWARD = "forward"  # forward-mode (jvp) Jacobian vs finite differences
    FORWARD_VS_REVERSE = "forward_vs_reverse"  # jvp vs vjp, no finite differences involved
    SECOND_ORDER = "second_order"  # Jacobian of the vjp (reverse over reverse) vs finite differences
    TAYLOR = "taylor"  # remainder of the first-order Taylor expansion must shrink as h^2
    DEVICES = "devices"  # analytic Jacobian on CPU vs on CUDA


class ElementError(BaseModel):
    """One Jacobian element: d output[output_index] / d input[input_index]."""

    model_config = ConfigDict(frozen=True)

    output_index: list[int]
    input_index: list[int]
    # For complex tensors each element has a real and an imaginary component
    # ("re" / "im"); empty for real tensors.
    output_part: str = ""
    input_part: str = ""
    analytic: float
    numeric: float
    error_bar: float = Field(description="estimated error of the numeric value")
    tolerance: float = Field(description="largest |analytic - numeric| accepted here")
    kink: bool = False

    @property
    def abs_error(self) -> float:
        return abs(self.analytic - self.numeric)

    def location(self, output: str, input: str) -> str:
        out = _index(self.output_index, self.output_part)
        inp = _index(self.input_index, self.input_part)
        return f"{output}{out} / {input}{inp}"


class PairReport(BaseModel):
    """The verdict for one (output, input) pair of one kind of check."""

    output: str
    input: str
    check: Check = Check.REVERSE
    status: Status
    mode: str = Field(description="'full' (whole Jacobian) or 'fast' (random projections)")
    output_shape: list[int]
    input_shape: list[int]
    dtype: str
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    max_error_ratio: float = Field(0.0, description="max |analytic - numeric| / tolerance; > 1 fails")
    elements_checked: int = 0
    elements_failed: int = 0
    kinks: int = 0
    worst: list[ElementError] = Field(default_factory=list)
    # Whole Jacobians (row-major, output elements x input elements), only for small pairs.
    analytic: list[float] | None = None
    numeric: list[float] | None = None
    error_bars: list[float] | None = None
    nondeterminism: float | None = Field(None, description="largest difference between two backward runs")
    taylor_rates: list[float] | None = None
    # |analytic - numeric| / tolerance, max-pooled to at most 128 x 128, kept for failing pairs.
    error_map: list[list[float]] | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return not self.status.failed

    @property
    def title(self) -> str:
        prefix = {
            Check.REVERSE: "",
            Check.FORWARD: "[jvp] ",
            Check.FORWARD_VS_REVERSE: "[jvp vs vjp] ",
            Check.SECOND_ORDER: "[2nd order] ",
            Check.TAYLOR: "[taylor] ",
            Check.DEVICES: "[cpu vs cuda] ",
        }[self.check]
        return f"{prefix}d {self.output} / d {self.input}"


class Report(BaseModel):
    """Everything a check found. ``ok`` is the verdict; ``str()`` the readable table."""

    ok: bool
    pairs: list[PairReport] = Field(default_factory=list)
    dtype: str = ""
    device: str = "cpu"
    mode: str = "full"
    scheme: str = "central"
    order: int = 1
    function: str = ""
    point: int | None = Field(None, description="index of the evaluation point (service)")
    error: str | None = Field(None, description="why the check could not run at this point (service)")
    notes: list[str] = Field(default_factory=list)
    options: dict[str, object] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    served_by: str = Field("", description="which server replica ran the check (service)")

    @property
    def failures(self) -> list[PairReport]:
        return [p for p in self.pairs if not p.ok]

    @property
    def kinks(self) -> int:
        return sum(p.kinks for p in self.pairs)

    @property
    def expected_mismatch(self) -> bool:
        """ok with failing pairs: the mismatch was asked for (``expect="mismatch"``) and found."""
        return self.ok and bool(self.failures)

    def plot(self, path: str | Path, *, all_pairs: bool = False) -> Path:
        """Write a PNG heatmap of |analytic - numeric| / tolerance per failing pair."""
        from gradcheck_svc.plot import plot_report

        return plot_report(self, Path(path), all_pairs=all_pairs)

    def __str__(self) -> str:
        return render(self)


# ----------------------------------------------------------------------------- rendering


def _index(index: list[int], part: str = "") -> str:
    inner = ", ".join(str(i) for i in index)
    text = f"[{inner}]" if index else ""
    return f"{text}.{part}" if part else text


def _num(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e6:
        return f"{value:.6g}"
    return f"{value:.4e}"


def _short(value: float) -> str:
    """Four significant digits: a glance at a passing value; the error columns carry the detail."""
    return f"{value:.4g}"


def _err(value: float) -> str:
    return f"{value:.1e}"


def _rel(pair: PairReport) -> str:
    # Errors only where the numeric value is exactly 0 have no relative size: say so.
    if pair.max_rel_error == 0 and pair.max_abs_error > 0:
        return "n/a (numeric 0)"
    return _err(pair.max_rel_error)


_SMALL_VALUES = 8  # pairs with at most this many Jacobian entries show every value


def _render_pair(pair: PairReport) -> list[str]:
    status = pair.status.value.upper() if pair.status.failed else pair.status.value
    shapes = f"{list(pair.output_shape)} <- {list(pair.input_shape)}"
    head = f"  {pair.title:<34} {status:<16} {shapes}"
    lines = [head]
    if pair.check == Check.TAYLOR and pair.taylor_rates is not None:
        rates = ", ".join(f"{r:.2f}" for r in pair.taylor_rates)
        lines.append(f"      convergence rates (2 expected): {rates}")
    elif pair.analytic is not None and pair.numeric is not None and len(pair.analytic) <= _SMALL_VALUES:
        bars = pair.error_bars or [float("nan")] * len(pair.analytic)
        for a, n, b in zip(pair.analytic, pair.numeric, bars, strict=True):
            lines.append(f"      analytic {_short(a):>10}   numeric {_short(n):>10} ± {_err(b)}")
    if pair.elements_checked:
        lines.append(
            f"      max abs err {_err(pair.max_abs_error)}  max rel err {_rel(pair)}  "
            f"err/tol {pair.max_error_ratio:.2g}  failed {pair.elements_failed}/{pair.elements_checked}"
            + (f"  kinks {pair.kinks}" if pair.kinks else "")
        )
    if pair.nondeterminism and pair.status == Status.NONDETERMINISTIC:  # 0: the forward's, not the backward's
        lines.append(
            f"      two backward runs differ by up to {_err(pair.nondeterminism)}, beyond nondet_tol (a "
            "backward nondeterministic by design, atomic adds on a GPU, passes with nondet_tol above it)"
        )
    if pair.message:
        lines.append(f"      {pair.message}")
    if pair.worst and (pair.status != Status.PASS):
        lines.append(
            f"      {'element':<30} {'analytic':>12} {'numeric':>12} {'error bar':>10} {'tolerance':>10}"
        )
        for el in pair.worst:
            loc = el.location(pair.output, pair.input) + ("  (kink)" if el.kink else "")
            lines.append(
                f"      {loc:<30} {_num(el.analytic):>12} {_num(el.numeric):>12} "
                f"{_err(el.error_bar):>10} {_err(el.tolerance):>10}"
            )
    return lines


def render(report: Report) -> str:
    verdict = "ok" if report.ok else "GRADIENT MISMATCH"
    if report.expected_mismatch:
        verdict = "ok, mismatch as expected"
    elif not report.ok and not report.failures:
        verdict = "NO MISMATCH, ONE WAS EXPECTED"
    if report.error:
        verdict = "ERROR"
    total = report.timings.get("total_s")
    took = f", {total:.3g} s" if total is not None else ""
    reference = report.options.get("reference")
    dtype = report.dtype + (f" vs {reference} differences" if reference and reference != report.dtype else "")
    where = f"{dtype}, {report.device}, {report.mode} mode, {report.scheme}"
    eps = report.options.get("eps")
    if isinstance(eps, float):
        where += f", h = {eps:.2g}·max(|x|, 1)"
    name = f" {report.function}" if report.function else ""
    point = f" at point {report.point}" if report.point is not None else ""
    lines = [f"gradcheck{name}{point}: {verdict} ({where}{took})"]
    if report.error:
        lines.append(f"  {report.error}")
    for pair in report.pairs:
        lines.extend(_render_pair(pair))
    lines.extend(f"  note: {note}" for note in report.notes)
    return "\n".join(lines)
