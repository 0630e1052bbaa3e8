"""Two computations of the same values: do they agree, and by how much do they differ?

Used wherever the engine runs something twice (a backward re-run for nondeterminism, a batched
evaluation against a plain call, f(x) evaluated again): NaN in both counts as agreement, NaN in
one only as an infinite difference, and equal values (infinities included) as no difference.
"""

from __future__ import annotations

import torch

__all__ = ["largest_change", "within"]


def within(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor | float) -> bool:
    """Every element of ``a`` and ``b`` equal, NaN in both, or within ``allowed`` of each other."""
    same = ((a - b).abs() <= allowed) | (a == b) | (a.isnan() & b.isnan())
    return bool(same.all())


def largest_change(first: torch.Tensor, again: torch.Tensor) -> float:
    """max |again - first| over the elements that changed; 0 for empty tensors."""
    delta = (again - first).abs().nan_to_num(nan=float("inf"))
    delta.masked_fill_((again == first) | (again.isnan() & first.isnan()), 0.0)
    return float(delta.max()) if delta.numel() else 0.0
