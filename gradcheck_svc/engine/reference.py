"""The numeric reference of a low-precision check: float64 copies of fn where fn allows it.

Finite differences of a float32 (or float16, bfloat16) function cannot see the rounding inside
it: where the forward saturates it is locally flat, and the noise measured from its own values
can be confidently wrong. When ``fn`` runs on float64 copies of its inputs (and module
parameters) and returns float64 values close to its low-precision ones, the finite differences
and their error bars come from that float64 copy; the analytic side stays in the user's dtype and
is judged with tolerances of that dtype. Otherwise the check falls back to differences in the
user's dtype, and says why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradcheck_svc.engine.agreement import FEW_VALUES
from gradcheck_svc.engine.numeric import defaults_for
from gradcheck_svc.engine.problem import Problem, build_problem
from gradcheck_svc.errors import CheckError

__all__ = ["Reference", "choose_reference", "narrowed_terms", "rounded_terms"]

_WIDE = (torch.float64, torch.complex128)
# A float64 copy whose values stray further than this many units of the low precision from the
# user's values is not the same function (it branches on dtype, or casts inside).
_AGREEMENT_ULPS = 2.0**12
# ``rounded_terms``: how many points near x it evaluates, and how far from x (relative).
_PROBE_POINTS = 8
_PROBE_SPREAD = 2.0**-6


@dataclass(frozen=True)
class Reference:
    """Where the numeric side runs: ``problem`` (the user's or a float64 copy), and why."""

    problem: Problem
    name: str  # "float64" or the user's dtype, e.g. "float32"
    reason: str  # empty when the inputs are float64 already


def _low_precision(problem: Problem) -> bool:
    dtypes = [leaf.dtype for leaf in problem.leaves] + [out.dtype for out in problem.outputs]
    return any(d not in _WIDE for d in dtypes)


def _dtype_label(problem: Problem) -> str:
    names = sorted({leaf.dtype_name for leaf in problem.leaves})
    return ",".join(names)


def choose_reference(
    problem: Problem,
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    input_names: Sequence[str] | None,
    device: torch.device | None,
    enabled: bool,
    wrt: Any = None,
) -> Reference:
    """A float64 copy of ``problem`` when it is low precision and fn runs in float64, else itself."""
    own = _dtype_label(problem)
    if not _low_precision(problem):
        return Reference(problem, own, "")
    if not enabled:
        return Reference(problem, own, "the float64 reference is not used for this kind of check")
    try:
        wide, _ = build_problem(
            fn, inputs, kwargs, input_names=input_names, device=device, upcast=True, wrt=wrt
        )
    except CheckError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Reference(
            problem, own, f"fn does not run on float64 copies of its inputs ({first_line[:160]})"
        )
    problem_of = _mismatch(problem, wide)
    if problem_of:
        return Reference(problem, own, f"fn's float64 copy is not the same function ({problem_of})")
    return Reference(wide, "float64", "fn runs on float64 copies of its inputs")


def _mismatch(low: Problem, wide: Problem) -> str:
    """Why ``wide`` cannot stand in for ``low`` on the numeric side; empty when it can."""
    if [leaf.shape for leaf in low.leaves] != [leaf.shape for leaf in wide.leaves]:
        return "other inputs"
    if [(o.shape, o.size) for o in low.outputs] != [(o.shape, o.size) for o in wide.outputs]:
        return "outputs of other shapes"
    narrow = [o.dtype for o in wide.outputs if o.dtype not in _WIDE]
    if narrow:
        return f"it returns {str(narrow[0]).removeprefix('torch.')}"
    assert low.first_call is not None and wide.first_call is not None
    f_low, f_wide = low.first_call[0].detach(), wide.first_call[0].detach()
    if f_wide.numel() <= FEW_VALUES and sum(leaf.size for leaf in wide.leaves) <= FEW_VALUES:
        return _mismatch_of_values(low, wide, f_low.tolist(), f_wide.tolist())
    if not torch.equal(torch.isfinite(f_low), torch.isfinite(f_wide)):
        return "it is finite at other elements"
    finite = torch.isfinite(f_wide)
    if bool(finite.any()):
        unit = defaults_for(*(o.dtype for o in low.outputs)).machine_eps
        scale = f_wide[finite].abs()
        # Rounding scales with the intermediates (of the size of the inputs), not with f alone:
        # a saturating GeLU returns 1e-6 computed from terms of size 5.
        inputs = [leaf.real.detach().abs().nan_to_num(nan=0.0, posinf=0.0) for leaf in wide.leaves]
        x_scale = max((float(t.max()) for t in inputs if t.numel()), default=0.0)
        allowed = _AGREEMENT_ULPS * unit * (scale + scale.max() + x_scale)
        if not bool(((f_low[finite] - f_wide[finite]).abs() <= allowed).all()):
            return "its values differ beyond the rounding of the low precision"
    return ""


def _mismatch_of_values(low: Problem, wide: Problem, f_low: list[float], f_wide: list[float]) -> str:
    """The value test of ``_mismatch`` on a few Python floats, with the same arithmetic."""
    if [math.isfinite(v) for v in f_low] != [math.isfinite(v) for v in f_wide]:
        return "it is finite at other elements"
    finite = [k for k, v in enumerate(f_wide) if math.isfinite(v)]
    if finite:
        unit = defaults_for(*(o.dtype for o in low.outputs)).machine_eps
        scale = [abs(f_wide[k]) for k in finite]
        largest = max(scale)
        x_scale = max(
            (max(_magnitude(v) for v in leaf.real.tolist()) for leaf in wide.leaves if leaf.size),
            default=0.0,
        )
        factor = _AGREEMENT_ULPS * unit
        if not all(
            abs(f_low[k] - f_wide[k]) <= factor * (s + largest + x_scale)
            for k, s in zip(finite, scale, strict=True)
        ):
            return "its values differ beyond the rounding of the low precision"
    return ""


def _magnitude(value: float) -> float:
    """|value| with NaN and +inf read as 0, as ``nan_to_num(nan=0.0, posinf=0.0)`` reads them."""
    magnitude = abs(value)
    return 0.0 if math.isnan(magnitude) or magnitude == math.inf else magnitude


def narrowed_terms(problem: Problem, seed: int) -> torch.Tensor:
    """``rounded_terms`` of a float64 problem, its float32 run as the low precision: float64
    has no wider reference, but the gap of a float32 copy measures the terms that cancel all the
    same. Zeros where fn does not run on float32 copies (it returns float64 from them, say): no
    measurement, no allowance."""
    if any(leaf.is_complex for leaf in problem.leaves) or any(o.is_complex for o in problem.outputs):
        return torch.zeros(problem.n_outputs, dtype=torch.float64)
    narrow = dataclasses.replace(
        problem,
        outputs=[dataclasses.replace(o, dtype=torch.float32) for o in problem.outputs],
        first_call=None,
        first_root=None,
    )
    return rounded_terms(narrow, problem, seed, narrow=torch.float32)


def rounded_terms(
    low: Problem, wide: Problem, seed: int, *, narrow: torch.dtype | None = None
) -> torch.Tensor:
    """Per output element, the size of the terms its low-precision forward rounds: the largest
    gap between the user's forward and the float64 copy at a few points near x (the same points
    in both dtypes), in units of the low precision.

    Where f is a cancellation (``(x - x.mean()).sum()``), |f| says nothing of the terms that
    cancel, and its gap at x alone may be zero by chance (both sides exactly 0); at a few
    points nearby it is not. Zeros where fn fails at a probe point or is not finite there.
    ``narrow``: the dtype of ``low``'s inputs where its leaves are not (a float32 run of a float64
    problem), else the leaves' own.
    """
    generator = torch.Generator().manual_seed(seed)
    unit = defaults_for(*(o.dtype for o in low.outputs)).machine_eps
    largest: torch.Tensor | None = None
    for _ in range(_PROBE_POINTS):
        lows, wides = [], []
        for leaf_low, leaf_wide in zip(low.leaves, wide.leaves, strict=True):
            base = leaf_low.real.detach()
            shift = torch.rand(base.shape, generator=generator, dtype=torch.float64).mul_(2).sub_(1)
            moved = (base.to(torch.float64) * (1 + _PROBE_SPREAD * shift.to(base.device))).to(
                narrow or base.dtype
            )
            lows.append(moved)
            wides.append(moved.to(leaf_wide.real.dtype))
        try:
            with torch.no_grad():
                gap = (low.flat(*lows) - wide.flat(*wides)).abs()
        except Exception:  # the user's function at a point of our choosing: no allowance
            return torch.zeros(sum(o.size for o in low.outputs), dtype=torch.float64)
        gap = gap.nan_to_num(nan=0.0, posinf=0.0)
        largest = gap if largest is None else torch.maximum(largest, gap)
    assert largest is not None
    return largest / unit
