"""The Taylor test: a tolerance-free check by convergence rate.

For a random direction ``d`` and cotangent ``v``, the first-order remainder
``r(h) = |v . (f(x + h d) - f(x)) - h v^T J d|`` is ``O(h^2)`` when ``J`` is
right and ``O(h)`` when it is wrong. Halving ``h`` should divide ``r`` by 4:
the observed rates ``log2(r(h) / r(h/2))`` are reported, 2 passes, 1 fails.
"""

from __future__ import annotations

import math

import torch

from gradcheck_svc.engine.compare import pair_fields
from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.probes import random_cotangents, random_directions
from gradcheck_svc.report import Check, PairReport, Status

__all__ = ["run_taylor"]

_HALVINGS = 6
_PASSING_RATE = 1.75
_RELIABLE_ABOVE_ULPS = 64.0
_COMBOS = 3


def _rates(remainder: torch.Tensor, noise: torch.Tensor) -> list[float]:
    """log2 of successive remainder ratios, where both stand above the round-off level."""
    rates = []
    for k in range(len(remainder) - 1):
        r0, r1 = float(remainder[k]), float(remainder[k + 1])
        if r0 > float(noise[k]) and r1 > float(noise[k + 1]):
            rates.append(math.log2(r0 / r1))
    return rates


def _asymptotic(rates: list[float]) -> float | None:
    # The smallest steps show the asymptotic rate: a wrong gradient may still look quadratic at
    # large h, where the h^2 term dominates a small error.
    tail = sorted(rates[-3:])
    return tail[len(tail) // 2] if tail else None


def run_taylor(ctx: Context) -> list[PairReport]:
    """Per pair, _COMBOS random (cotangent, direction) combinations; the median of their
    asymptotic rates decides, so one combination whose h^2 term happens to cancel (then the
    remainder crosses zero and its rates mean nothing) cannot fail a correct gradient."""
    problem = ctx.problem
    generator = torch.Generator().manual_seed(ctx.options.seed)
    device = ctx.f0.device
    cotangents = random_cotangents(problem.outputs, _COMBOS, generator, device)
    grads = ctx.analytic.rows(cotangents)
    machine_eps = ctx.machine_eps
    f0_abs = ctx.f0.abs().nan_to_num()
    reports = []
    for i, leaf in enumerate(problem.leaves):
        ctx.poll()
        directions = random_directions(leaf.real, _COMBOS, generator)
        h0 = 2.0 ** round(math.log2(max(ctx.eps(leaf) ** 0.25, 2**-6)))
        hs = [h0 / 2**k for k in range(_HALVINGS + 1)]
        base = leaf.real.detach().to(torch.float64)
        batch = torch.stack([(base + h * d).to(leaf.real_dtype) for d in directions for h in hs])
        applied = (batch.to(torch.float64) - base).reshape(_COMBOS, len(hs), -1)  # actual steps
        values = ctx.evaluate(i, batch).reshape(_COMBOS, len(hs), -1)
        for o, block in enumerate(problem.outputs):
            per_combo: list[tuple[float, list[float]]] = []
            finite = True
            for c in range(_COMBOS):
                v = cotangents[o * _COMBOS + c]
                linear = applied[c] @ grads[i][o * _COMBOS + c]  # h v^T J d for the applied step
                remainder = ((values[c] - ctx.f0) @ v - linear).abs()
                finite &= bool(torch.isfinite(remainder).all())
                noise = _RELIABLE_ABOVE_ULPS * machine_eps * (float(v.abs() @ f0_abs) + linear.abs())
                rates = _rates(remainder, noise)
                rate = _asymptotic(rates)
                if rate is not None:
                    per_combo.append((rate, rates))
            shown: list[float]
            if not finite:
                status, message, shown = Status.NONFINITE, "the remainder is not finite", []
            elif not per_combo:
                status, shown = Status.PASS, []
                message = "remainder at round-off level for every h (f is locally linear)"
            else:
                per_combo.sort(key=lambda item: item[0])
                rate, shown = per_combo[len(per_combo) // 2]
                status = Status.PASS if rate >= _PASSING_RATE else Status.FAIL
                message = f"observed convergence rate {rate:.2f} (2 expected, 1 means a wrong gradient)"
            reports.append(
                PairReport(
                    **pair_fields(block, leaf),
                    check=Check.TAYLOR,
                    status=status,
                    mode="taylor",
                    taylor_rates=[round(r, 4) for r in shown],
                    elements_checked=len(hs) * _COMBOS,
                    message=message,
                )
            )
    return reports
