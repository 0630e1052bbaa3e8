"""Two computations of the same values: do they agree, and by how much do they differ?

Used wherever the engine runs something twice (a backward re-run for nondeterminism, a batched
evaluation against a plain call, f(x) evaluated again): NaN in both counts as agreement, NaN in
one only as an infinite difference, and equal values (infinities included) as no difference.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FEW_VALUES",
    "all_finite",
    "largest_change",
    "largest_change_of_floats",
    "same_contents",
    "same_values",
    "within",
    "within_ulps",
]

# Tensors up to this many elements are compared (or read) as Python floats: no torch op to pay.
FEW_VALUES = 64
# Up to this many elements, finiteness is read element by element as Python floats.
_FEW_FINITE = 16


def all_finite(values: torch.Tensor) -> bool:
    """Whether every element of a real tensor is finite. NaN and inf reach its sum (inf - inf is
    NaN), so a finite sum answers in one reduction and one read, where a mask and its reduction
    cost several times that; only a sum that overflowed needs the elementwise test."""
    if values.numel() <= _FEW_FINITE:
        flat = values if values.dim() == 1 else values.reshape(-1)
        return all(math.isfinite(v) for v in flat.tolist())
    return math.isfinite(values.sum().item()) or bool(torch.isfinite(values).all())


def within(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor | float) -> bool:
    """Every element of ``a`` and ``b`` equal, NaN in both, or within ``allowed`` of each other."""
    same = ((a - b).abs() <= allowed) | (a == b) | (a.isnan() & b.isnan())
    return bool(same.all())


def largest_change(first: torch.Tensor, again: torch.Tensor) -> float:
    """max |again - first| over the elements that changed; 0 for empty tensors."""
    if first.numel() <= FEW_VALUES and first.shape == again.shape:
        return largest_change_of_floats(first.reshape(-1).tolist(), again.reshape(-1).tolist())
    if torch.equal(first, again):  # the usual answer, in one op (NaN is unequal: it goes on below)
        return 0.0
    delta = (again - first).abs().nan_to_num(nan=float("inf"))
    delta.masked_fill_((again == first) | (again.isnan() & first.isnan()), 0.0)
    return float(delta.max()) if delta.numel() else 0.0


def largest_change_of_floats(first: list[float], again: list[float]) -> float:
    """``largest_change`` of two equally long lists of floats."""
    largest = 0.0
    for a, b in zip(first, again, strict=True):
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        delta = abs(b - a)
        largest = max(largest, math.inf if math.isnan(delta) else delta)
    return largest


def within_ulps(
    a: torch.Tensor, b: torch.Tensor, unit: float, *, ulps: float = 64.0, both: bool = False
) -> bool:
    """``within`` with an allowance of ``ulps`` units ``unit`` of each element's magnitude plus
    the largest magnitude (non-finite magnitudes count 0): that of ``b``, or of the larger of
    the two with ``both``. The same arithmetic on lists for a few elements."""
    if torch.equal(a, b):  # the usual answer, in one op (NaN is unequal: it goes on below)
        return True
    if a.numel() > FEW_VALUES or a.shape != b.shape:
        size = (torch.maximum(a.abs(), b.abs()) if both else b.abs()).nan_to_num(nan=0.0, posinf=0.0)
        allowed = ulps * unit * (size + (size.max() if size.numel() else 0.0))
        return within(a, b, allowed)
    first: list[float] = a.reshape(-1).tolist()
    again: list[float] = b.reshape(-1).tolist()
    scale = [_magnitude(x, y) if both else _magnitude(y, y) for x, y in zip(first, again, strict=True)]
    largest = max(scale, default=0.0)
    factor = ulps * unit
    return all(
        abs(x - y) <= factor * (s + largest) or x == y or (math.isnan(x) and math.isnan(y))
        for x, y, s in zip(first, again, scale, strict=True)
    )


def same_values(first: torch.Tensor, again: torch.Tensor, unit: float) -> bool:
    """Whether ``again`` repeats ``first`` (f(x) computed twice): equal, or within a few ulps
    ``unit``; with autograd on, a library may pick another kernel and round differently, which
    is not nondeterminism (and smaller noise shows up in the error bars anyway)."""
    if first.numel() <= FEW_VALUES and first.shape == again.shape and first.tolist() == again.tolist():
        return True  # equal values (a NaN never compares equal: those go on to within_ulps)
    return within_ulps(again, first, unit)


def same_contents(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` holds exactly what ``a`` holds: shape, dtype and values, NaN where NaN was
    (a copy taken before a call of fn, against the tensor after it)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return (a.is_floating_point() or a.is_complex()) and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _magnitude(x: float, y: float) -> float:
    """max(|x|, |y|) as torch.maximum then nan_to_num(nan=0, posinf=0) give it: NaN in either, or
    an infinite magnitude, counts 0."""
    if math.isnan(x) or math.isnan(y):
        return 0.0
    m = max(abs(x), abs(y))
    return 0.0 if m == math.inf else m
