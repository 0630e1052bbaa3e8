"""Piecewise functions at and near their corners, with ties, on grids; with planted-bug twins.

Kinks and ties are where tests people write put their points: ``torch.tensor([0., 1., 1., 2.])``,
integers, multiples of 0.5, a relu input at exactly 0, a clamp input at exactly its bound, a max
over a window of equal values, a topk cut through a tie. Each case is a function of one tensor
``x`` (its piecewise parts torch's own ops or hand-written autograd.Functions) and a point maker.

Twins (``planted``): the case's backward, exact elsewhere, wrong at one element ``j``:

- ``smooth``: 1% off at an element where the function is smooth (no corner, no tie within 0.1:
  every column of the Jacobian is unique there), so every checker must catch it;
- ``at_tie``: at an input equal to another, the other's gradient added to its own (a tie counted
  twice): must be caught;
- ``at_kink``: at an element that sits on a corner, where the two one-sided derivatives are each
  unique, the gradient is moved beyond their interval (``+ (jump + 1) g``), no subgradient at all:
  a kink verdict must not excuse it.

``smooth_element`` and ``kink_element`` pick ``j`` from the float64 point, by one-sided
differences with a tiny step (independent of the checker): None when the point has no such
element (the twin is then not run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "KINK_CASES",
    "KinkCase",
    "kink_element",
    "make_kink_input",
    "planted",
    "smooth_element",
    "tied_pair",
]


# --- hand-written piecewise Functions (correct) ------------------------------------------------


class HandRelu(torch.autograd.Function):
    """relu with the mask people write: ``x > 0`` (0 at the corner)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0).to(g.dtype)


class SoftThreshold(torch.autograd.Function):
    """The lasso proximal step ``sign(x) max(|x| - lam, 0)``, lam = 0.5: corners at +-0.5."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x) * (x.abs() - 0.5).clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() > 0.5).to(g.dtype)


class Hinge(torch.autograd.Function):
    """Mean hinge loss ``mean(max(0, 1 - y x))`` against labels y = +-1 (alternating): corners
    where ``y x = 1``."""

    @staticmethod
    def forward(ctx, x):
        y = _labels(x)
        ctx.save_for_backward(x, y)
        return (1 - y * x).clamp(min=0).mean()

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * -y * ((1 - y * x) > 0).to(g.dtype) / x.numel()


class SmoothL1(torch.autograd.Function):
    """Smooth-L1 (Huber) against a target of 0, beta = 1: C1 at its switch points |x| = 1, where
    the second derivative jumps (the backward is exact there: x, clamped to [-1, 1])."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        a = x.abs()
        return torch.where(a < 1, 0.5 * x * x, a - 0.5).sum()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.clamp(-1, 1)


def _labels(x: torch.Tensor) -> torch.Tensor:
    y = torch.ones_like(x).reshape(-1)
    y[1::2] = -1
    return y.reshape(x.shape)


# --- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KinkCase:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    point: Callable[[torch.Generator, int], torch.Tensor]  # float64, from a seeded generator and a size
    corners: tuple[float, ...] = ()  # input values where an elementwise piece has a corner
    ties: bool = False  # equal input values are ties of the function (max, sort, ...)


def _grid(step: float, low: int, high: int) -> Callable[[torch.Generator, int], torch.Tensor]:
    """Multiples of ``step`` between ``low * step`` and ``high * step``: corners and ties galore."""

    def make(g: torch.Generator, n: int) -> torch.Tensor:
        return torch.randint(low, high + 1, (n,), generator=g).to(torch.float64) * step

    return make


def _near(corner: float) -> Callable[[torch.Generator, int], torch.Tensor]:
    """Points at and near ``corner``: exactly on it, and offset by fractions and multiples of the
    float32 and float64 steps (2^-7, 2^-16 times max(|x|, 1)), on both sides, plus a few far off."""

    def make(g: torch.Generator, n: int) -> torch.Tensor:
        scale = max(abs(corner), 1.0)
        offsets = [
            0.0,
            1e-12,
            -1e-12,
            2.0**-18,
            -(2.0**-17),
            3 * 2.0**-17,
            2.0**-9,
            -(2.0**-8),
            0.75 * 2.0**-7,
        ]
        offsets += [1.5 * 2.0**-7, -(2.0**-7) / 3, 0.3, -0.7]
        picks = torch.randperm(len(offsets), generator=g)[: min(n, len(offsets))]
        x = torch.tensor([corner + scale * offsets[k] for k in picks.tolist()], dtype=torch.float64)
        if n > x.numel():  # the rest far from the corner
            x = torch.cat([x, corner + 0.5 + torch.rand(n - x.numel(), generator=g, dtype=torch.float64)])
        return x

    return make


def _matrix(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(-2, 3, (n, n), generator=g).to(torch.float64) * 0.5


def _mixed(x: torch.Tensor) -> torch.Tensor:
    """Smooth and piecewise parts composed: relu of a linear map on a grid hits 0 exactly."""
    w = _matrix(0, x.numel()).to(x.dtype)
    return torch.tanh(F.relu(w @ x)) * torch.exp(x / 4) + x.abs() * torch.sin(x)


def _pool(x: torch.Tensor) -> torch.Tensor:
    n = x.numel() - x.numel() % 4
    return torch.sin(F.max_pool1d(x[:n].reshape(1, 1, n), 2).reshape(-1)) + x[:n:2]


KINK_CASES: tuple[KinkCase, ...] = (
    KinkCase("relu_grid", torch.relu, _grid(0.5, -3, 3), corners=(0.0,)),
    KinkCase("relu_near0", lambda x: torch.relu(x) * torch.cos(x), _near(0.0), corners=(0.0,)),
    KinkCase("leaky_relu_grid", lambda x: F.leaky_relu(x, 0.1), _grid(0.5, -3, 3), corners=(0.0,)),
    KinkCase("abs_grid", lambda x: torch.abs(x) * (1 + x * x / 8), _grid(0.5, -3, 3), corners=(0.0,)),
    KinkCase("abs_near0", torch.abs, _near(0.0), corners=(0.0,)),
    KinkCase("clamp_grid", lambda x: torch.clamp(x, -1.0, 1.0), _grid(0.5, -4, 4), corners=(-1.0, 1.0)),
    KinkCase(
        "clamp_near1", lambda x: torch.clamp(x, -1.0, 1.0) * torch.exp(x), _near(1.0), corners=(-1.0, 1.0)
    ),
    KinkCase("hardtanh_grid", lambda x: F.hardtanh(x) ** 3, _grid(0.5, -4, 4), corners=(-1.0, 1.0)),
    KinkCase("hardswish_grid", F.hardswish, _grid(1.0, -5, 5), corners=(-3.0, 3.0)),
    KinkCase("hardswish_near3", F.hardswish, _near(-3.0), corners=(-3.0, 3.0)),
    KinkCase("max_ties", lambda x: torch.max(x) + torch.sin(x).sum(), _grid(1.0, 0, 3), ties=True),
    KinkCase("amax_rows", lambda x: x.reshape(-1, 2).amax(-1) * 2, _grid(1.0, 0, 2), ties=True),
    KinkCase("min_rows", lambda x: x.reshape(-1, 2).min(-1).values, _grid(0.5, 0, 2), ties=True),
    KinkCase("maxpool_ties", _pool, _grid(1.0, 0, 2), ties=True),
    KinkCase("topk_ties", lambda x: torch.topk(x, 2).values, _grid(0.5, 0, 2), ties=True),
    KinkCase(
        "sort_ties",
        lambda x: torch.sort(x).values * torch.arange(1.0, x.numel() + 1),
        _grid(1.0, 0, 2),
        ties=True,
    ),
    KinkCase("median_ties", lambda x: torch.median(x) + x.sum() / 4, _grid(1.0, 0, 2), ties=True),
    KinkCase("cummax_ties", lambda x: torch.cummax(x, 0).values, _grid(1.0, 0, 3), ties=True),
    KinkCase("hand_relu", lambda x: HandRelu.apply(x) * torch.sigmoid(x), _grid(0.5, -3, 3), corners=(0.0,)),
    KinkCase("soft_threshold", SoftThreshold.apply, _grid(0.25, -6, 6), corners=(-0.5, 0.5)),
    KinkCase("hinge", Hinge.apply, _grid(0.5, -4, 4), corners=(-1.0, 1.0)),
    KinkCase("smooth_l1", SmoothL1.apply, _grid(0.5, -4, 4), corners=(-1.0, 1.0)),
    KinkCase("mixed", _mixed, _grid(0.5, -3, 3), corners=(0.0,), ties=True),
)


def make_kink_input(case: KinkCase, seed: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The case's point for ``seed`` with ``n`` elements (a tie or a corner is likely, not certain)."""
    g = torch.Generator().manual_seed(seed)
    return case.point(g, n).to(dtype)


# --- planted bugs --------------------------------------------------------------------------------


def _one_sided(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, h: float = 1e-7):
    """Per input element, the largest |D+ - D-| over the outputs, and whether its column moves."""
    x = x.detach().to(torch.float64)
    f0 = fn(x).reshape(-1)
    jump, moves = [], []
    for j in range(x.numel()):
        e = torch.zeros_like(x).reshape(-1)
        e[j] = h
        e = e.reshape(x.shape)
        plus = (fn(x + e).reshape(-1) - f0) / h
        minus = (f0 - fn(x - e).reshape(-1)) / h
        jump.append(float((plus - minus).abs().max()))
        moves.append(bool((plus.abs() + minus.abs()).max() > 1e-3))
    return jump, moves


def smooth_element(case: KinkCase, x: torch.Tensor) -> int | None:
    """An element where the function is smooth and its column of the Jacobian moves: no corner
    within 0.1, no equal value elsewhere when the case has ties; the first in a seeded order."""
    flat = x.detach().to(torch.float64).reshape(-1)
    jump, moves = _one_sided(case.fn, x)
    for j in range(flat.numel()):
        v = float(flat[j])
        if any(abs(v - c) < 0.1 for c in case.corners):
            continue
        if case.ties and int((flat == flat[j]).sum()) > 1:
            continue
        if jump[j] < 1e-4 and moves[j]:
            return j
    return None


def kink_element(case: KinkCase, x: torch.Tensor) -> tuple[int, float] | None:
    """An element that sits on a corner (its one-sided derivatives differ by more than 0.05) and
    the offset ``jump + 1`` that moves its gradient outside every subgradient, for elementwise or
    scalar-valued cases only (where the cotangent of its row is known)."""
    out = case.fn(x.detach().to(torch.float64))
    if out.numel() != 1 and out.shape != x.shape:
        return None
    jump, _ = _one_sided(case.fn, x)
    for j, size in enumerate(jump):
        if size > 0.05:
            return j, size + 1.0
    return None


def tied_pair(case: KinkCase, x: torch.Tensor) -> tuple[int, float] | None:
    """Two equal inputs ``(j, k)`` of a case with ties, the gradient of ``k`` nonzero for some
    output (``k`` is returned as the offset's place): the twin ``at_tie`` adds ``k``'s gradient
    to ``j``'s, a tie counted twice, which no subgradient does."""
    if not case.ties:
        return None
    flat = x.detach().to(torch.float64).reshape(-1)
    leaf = flat.clone().requires_grad_(True)
    out = case.fn(leaf).reshape(-1)
    jac = torch.stack([torch.autograd.grad(out[r], leaf, retain_graph=True)[0] for r in range(out.numel())])
    for j in range(flat.numel()):
        for k in range(flat.numel()):
            if k != j and bool(flat[k] == flat[j]) and bool(jac[:, k].abs().max() > 0.1):
                return j, float(k)
    return None


class _Planted(torch.autograd.Function):
    """The case's own backward (autograd through ``fn``), then ``bug`` applied to the gradient."""

    @staticmethod
    def forward(ctx, x, fn, bug):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = fn(leaf)
        ctx.save_for_backward(leaf, out)
        ctx.bug = bug
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        leaf, out = ctx.saved_tensors
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(out, leaf, g, allow_unused=True, retain_graph=True)
        if grad is None:
            grad = torch.zeros_like(leaf)
        return ctx.bug(grad, g), None, None


def planted(case: KinkCase, kind: str, j: int, offset: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The case with a backward wrong at element ``j``: ``smooth`` 1% off, ``at_kink`` ``+ offset g``
    (``kink_element``'s offset: beyond the one-sided derivatives' interval), ``at_tie`` plus the
    gradient of the tied element ``offset`` (``tied_pair``)."""

    def bug(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        flat = grad.reshape(-1).clone()
        if kind == "smooth":
            flat[j] = flat[j] * 1.01
        elif kind == "at_tie":
            flat[j] = flat[j] + grad.reshape(-1)[int(offset)]
        elif kind == "at_kink":
            flat[j] = flat[j] + offset * (g.reshape(-1)[j] if g.numel() == flat.numel() else g.sum())
        else:
            raise ValueError(kind)
        return flat.reshape(grad.shape)

    def call(x: torch.Tensor) -> torch.Tensor:
        return _Planted.apply(x, case.fn, bug)

    call.__name__ = call.__qualname__ = f"{case.name}[{kind}]"
    return call
