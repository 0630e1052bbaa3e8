"""The vectors a check multiplies Jacobians by: one-hot rows and columns, seeded random probes.

Full mode takes Jacobian rows with one-hot cotangents and columns with one-hot directions; fast
mode and the Taylor test project on seeded random directions and cotangents. All of them live
here so every driver draws them the same way.
"""

from __future__ import annotations

import torch

from gradcheck_svc.engine.problem import OutputBlock

__all__ = ["onehot", "random_cotangents", "random_directions"]

_LEVELS = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)


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
    level = _LEVELS[torch.randint(0, 3, (count, n), generator=generator)]
    sign = torch.randint(0, 2, (count, n), generator=generator).to(torch.float64) * 2 - 1
    scale = torch.exp2(torch.round(torch.log2(base.detach().to("cpu", torch.float64).abs().clamp(min=1.0))))
    scale = torch.where(scale.isfinite(), scale, 0.0)  # +-inf and NaN elements are not moved
    return (level * sign * scale).to(base.device)


def random_cotangents(
    outputs: list[OutputBlock], count: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``count`` Gaussian cotangents per output block, zero outside it: ``(len(outputs) * count, M)``.

    Rows ``o * count ... (o + 1) * count`` belong to block ``o``.
    """
    m = sum(block.size for block in outputs)
    cotangents = torch.zeros(len(outputs) * count, m, dtype=torch.float64)
    for o, block in enumerate(outputs):
        cotangents[o * count : (o + 1) * count, block.rows] = torch.randn(
            count, block.size, generator=generator, dtype=torch.float64
        )
    return cotangents.to(device)
