"""Evaluation points drawn reproducibly from a seed.

The same ``SamplingSpec`` gives the same tensors on every machine: values are drawn on the CPU
in float64 from one generator seeded with ``seed``, point by point and input by input, then cast
to each input's dtype. Clients can call ``sample_points`` to see exactly what a server checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["SampledInput", "SamplingSpec", "sample_points"]


@dataclass(frozen=True)
class SampledInput:
    """How to draw one input of each point."""

    name: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float64
    distribution: Literal["normal", "uniform"] = "normal"
    mean: float = 0.0  # normal
    std: float = 1.0  # normal
    low: float = 0.0  # uniform
    high: float = 1.0  # uniform
    requires_grad: bool = False


@dataclass(frozen=True)
class SamplingSpec:
    """``count`` points, each with one tensor per input."""

    inputs: Sequence[SampledInput] = field(default_factory=tuple)
    count: int = 1
    seed: int = 0


def _draw(spec: SampledInput, generator: torch.Generator) -> torch.Tensor:
    def one() -> torch.Tensor:
        if spec.distribution == "uniform":
            u = torch.rand(spec.shape, generator=generator, dtype=torch.float64)
            return u * (spec.high - spec.low) + spec.low
        return torch.randn(spec.shape, generator=generator, dtype=torch.float64) * spec.std + spec.mean

    value = torch.complex(one(), one()) if spec.dtype.is_complex else one()
    return value.to(spec.dtype).requires_grad_(spec.requires_grad)


def sample_points(spec: SamplingSpec) -> list[dict[str, torch.Tensor]]:
    """Expand ``spec`` into ``count`` points ({name: tensor}, in input order)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(spec.seed)
    return [{i.name: _draw(i, generator) for i in spec.inputs} for _ in range(spec.count)]
