"""The vectors a check multiplies Jacobians by: one-hot rows and columns, seeded random probes.

Full mode takes Jacobian rows with one-hot cotangents and columns with one-hot directions; fast
mode and the Taylor test project on seeded random directions and cotangents. All of them live
here so every driver draws them the same way.
"""

from __future__ import annotations

import math

import torch

from gradcheck_svc.engine.problem import OutputBlock

__all__ = [
    "onehot",
    "random_cotangents",
    "random_direction_rows",
    "random_directions",
    "random_directions_of",
]

_LEVEL_VALUES = (0.5, 0.75, 1.0)
_SIGNED_LEVELS = torch.tensor([s * v for v in _LEVEL_VALUES for s in (-1.0, 1.0)], dtype=torch.float64)
_FEW = 16  # directions of up to this many elements are drawn into Python floats


def onehot(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Rows ``e_p`` for each position ``p``: ``(len(positions), size)`` float64, on their device."""
    rows = torch.zeros(positions.numel(), size, dtype=torch.float64, device=positions.device)
    rows[torch.arange(positions.numel(), device=positions.device), positions] = 1.0
    return rows


def random_directions(base: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Random directions whose entries have few mantissa bits, scaled by a power of two of max(|x|, 1).

    Few bits keep ``x + t * u`` exactly representable for power-of-two ``t``, so the
    perturbation applied is the one the analytic side projects on.
    """
    n = base.numel()
    if count * n <= _FEW:
        # The same draws and products on floats: a few elements cost no torch ops.
        rows = random_direction_rows(base.detach().tolist(), count, generator)
        return torch.tensor(rows, dtype=torch.float64, device=base.device).reshape(count, n)
    level = torch.randint(0, 3, (count, n), generator=generator)
    sign = torch.randint(0, 2, (count, n), generator=generator)
    scales = torch.exp2(torch.round(torch.log2(base.detach().to("cpu", torch.float64).abs().clamp(min=1.0))))
    scales = torch.nan_to_num(scales, nan=0.0, posinf=0.0)  # +-inf and NaN elements are not moved
    # level * (2 sign - 1), looked up at 2 level + sign: the same values in fewer ops
    return (torch.take(_SIGNED_LEVELS, level.mul_(2).add_(sign)) * scales).to(base.device)


def random_directions_of(bases: list[torch.Tensor], count: int, generator: torch.Generator) -> torch.Tensor:
    """``random_directions`` of each tensor in ``bases`` in turn (the same draws, in the same
    order), side by side: ``(count, total elements)``, each scale computed once for all."""
    if count == 1:
        # Each leaf's draws into its slice of one buffer (``randint`` is ``empty`` and ``random_``:
        # the same draws), with no tensors to join.
        sizes = [base.numel() for base in bases]
        level = torch.empty(2, sum(sizes), dtype=torch.int64)
        sign = level[1]
        level = level[0]
        lo = 0
        for size in sizes:
            level[lo : lo + size].random_(0, 3, generator=generator)
            sign[lo : lo + size].random_(0, 2, generator=generator)
            lo += size
        code = torch.add(sign, level, alpha=2).unsqueeze(0)
    else:
        levels, signs = [], []
        for base in bases:
            levels.append(torch.randint(0, 3, (count, base.numel()), generator=generator))
            signs.append(torch.randint(0, 2, (count, base.numel()), generator=generator))
        code = torch.cat(levels, dim=1).mul_(2).add_(torch.cat(signs, dim=1))
    # a leaf's flat values (``Leaf.real``) are read as they are: no detach or reshape to pay
    flats = [
        base if base.dim() == 1 and not base.requires_grad else base.detach().reshape(-1) for base in bases
    ]
    flat = torch.cat(flats) if len(flats) > 1 else flats[0]
    # level * (2 sign - 1), looked up at 2 level + sign, times the power of two nearest max(|x|, 1)
    scales = flat.to("cpu", torch.float64).abs().clamp_(min=1.0).log2_().round_().exp2_()
    scales = scales.nan_to_num_(nan=0.0, posinf=0.0)  # +-inf and NaN elements are not moved
    return torch.take(_SIGNED_LEVELS, code).mul_(scales).to(bases[0].device)


def random_direction_rows(values: list[float], count: int, generator: torch.Generator) -> list[list[float]]:
    """``random_directions`` of a leaf given as Python floats, as ``count`` lists: the same draws
    from ``generator`` and the same products, without a tensor."""
    n = len(values)
    level = torch.randint(0, 3, (count, n), generator=generator).tolist()
    sign = torch.randint(0, 2, (count, n), generator=generator).tolist()
    scale = [_power_of_two_scale(x) for x in values]
    return [
        [_LEVEL_VALUES[lv] * (sg * 2.0 - 1) * sc for lv, sg, sc in zip(lr, sr, scale, strict=True)]
        for lr, sr in zip(level, sign, strict=True)
    ]


def _power_of_two_scale(x: float) -> float:
    """The power of two nearest max(|x|, 1) in the exponent, as the tensor formula; 0 where
    that is not finite (+-inf and NaN elements are not moved)."""
    if not math.isfinite(x):
        return 0.0
    try:
        return 2.0 ** round(math.log2(max(abs(x), 1.0)))
    except OverflowError:
        return 0.0


def random_cotangents(
    outputs: list[OutputBlock], count: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``count`` Gaussian cotangents per output block, zero outside it: ``(len(outputs) * count, M)``.

    Rows ``o * count ... (o + 1) * count`` belong to block ``o``.
    """
    m = sum(block.size for block in outputs)
    if len(outputs) == 1:  # the same draws, without a zero matrix to fill
        return torch.randn(count, m, generator=generator, dtype=torch.float64).to(device)
    cotangents = torch.zeros(len(outputs) * count, m, dtype=torch.float64)
    for o, block in enumerate(outputs):
        cotangents[o * count : (o + 1) * count, block.rows] = torch.randn(
            count, block.size, generator=generator, dtype=torch.float64
        )
    return cotangents.to(device)
