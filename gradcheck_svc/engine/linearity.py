"""A backward must be linear in grad_output: the nondeterminism re-run doubles its cotangents.

A Jacobian read with unit cotangents cannot see a backward that ignores grad_output's values
where fn has a single output element (a loss: ``grad_output = 1`` is its only row), nor one that
transforms them elementwise (``sign``, a constant added where grad_output is non-zero). The
re-run of the backward that looks for nondeterminism therefore uses cotangents twice as large
and halves what it gets: exact in floating point for any backward linear in grad_output (a power
of two scales every product and sum exactly), so a change is nondeterminism or a backward that
is not linear; one plain re-run, made only then, tells the two apart. Exact except where values
underflow: a subnormal result of the first run has fewer bits than the doubled one, so changes
within ``_UNDERFLOW_SHARE`` of the leaf's largest value do not count as nonlinearity (a backward
that ignores grad_output is off by half of its values), nor where they overflow: a float16
gradient above half its largest finite value is inf when doubled.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

__all__ = ["RERUN_SCALE", "nonlinear_message", "separate", "unscaled"]

RERUN_SCALE = 2.0
_UNDERFLOW_SHARE = 2.0**-8


def unscaled(g: torch.Tensor, scale: float) -> torch.Tensor:
    """A gradient of cotangents ``scale`` times as large, divided back; autograd's zero tensor
    without storage (which ``tolist`` refuses) made a plain one."""
    if g._is_zerotensor():
        return torch.zeros(g.shape, dtype=g.dtype, device=g.device)
    return g if scale == 1.0 else g / scale


def separate(
    scaled: Sequence[float],
    plain: Callable[[], Sequence[float]],
    tolerance: float,
    largest: Sequence[float],
) -> list[tuple[float, float | None]]:
    """Per leaf, from the largest changes of the doubled re-run: ``(nondeterminism,
    nonlinearity)``, the second None unless the doubled run changed beyond ``tolerance`` and
    beyond the underflow share of the leaf's ``largest`` |value|, and stayed finite (doubling
    overflowed otherwise), while a plain re-run
    (``plain()``, called only then) did not change beyond ``tolerance``."""
    if all(delta <= tolerance for delta in scaled):
        return [(delta, None) for delta in scaled]
    again = plain()
    found: list[tuple[float, float | None]] = []
    for delta, same, size in zip(scaled, again, largest, strict=True):
        if delta <= tolerance:
            found.append((delta, None))
        else:
            # inf (the tensor path counts it as the largest float): the doubled values overflowed
            overflowed = not delta < sys.float_info.max
            linear = same > tolerance or delta <= _UNDERFLOW_SHARE * size or overflowed
            found.append((same, None if linear else delta))
    return found


def nonlinear_message(delta: float) -> str:
    """Why a pair whose values may all agree fails: its backward is not linear in grad_output."""
    return (
        "the backward is not linear in grad_output: for grad_output 2v it returns other than twice "
        f"its result for v (by up to {delta:.3g}); it ignores or transforms grad_output's values "
        "(a missing `grad_output *`?), which the Jacobian's unit rows alone cannot show"
    )
