"""The Taylor test: a tolerance-free check by convergence rate.

For a random direction ``d`` and cotangent ``v``, the first-order remainder
``r(h) = |v . (f(x + h d) - f(x)) - h v^T J d|`` is ``O(h^2)`` when ``J`` is
right and ``O(h)`` when it is wrong. Halving ``h`` should divide ``r`` by 4:
the observed rates ``log2(r(h) / r(h/2))`` are reported, 2 passes, 1 fails.
"""

from __future__ import annotations

import math

import torch

from gradcheck_svc.engine.context import Context
from gradcheck_svc.engine.fast import _directions
from gradcheck_svc.report import Check, PairReport, Status

__all__ = ["run_taylor"]

_HALVINGS = 6
_PASSING_RATE = 1.75


def run_taylor(ctx: Context) -> list[PairReport]:
    problem = ctx.problem
    generator = torch.Generator().manual_seed(ctx.options.seed)
    device = ctx.f0.device
    m = problem.n_outputs
    cotangents = torch.zeros(len(problem.outputs), m, dtype=torch.float64)
    for o, block in enumerate(problem.outputs):
        cotangents[o, block.rows] = torch.randn(block.size, generator=generator, dtype=torch.float64)
    cotangents = cotangents.to(device)
    grads = ctx.analytic.rows(cotangents)
    machine_eps = ctx.machine_eps
    reports = []
    for i, leaf in enumerate(problem.leaves):
        ctx.poll()
        d = _directions(leaf.real, 1, generator)[0]
        h0 = 2.0 ** round(math.log2(max(ctx.eps(leaf) ** 0.25, 2**-6)))
        hs = [h0 / 2**k for k in range(_HALVINGS + 1)]
        base = leaf.real.detach().to(torch.float64)
        batch = torch.stack([(base + h * d).to(leaf.real_dtype) for h in hs])
        applied = batch.to(torch.float64) - base  # the perturbation actually applied, per h
        values = ctx.evaluate(i, batch)  # (K, M)
        for o, block in enumerate(problem.outputs):
            v = cotangents[o]
            g = grads[i][o]
            linear = applied @ g  # h v^T J d, for the applied perturbation
            change = (values - ctx.f0) @ v
            remainder = (change - linear).abs()
            noise = machine_eps * float((v.abs() @ ctx.f0.abs().nan_to_num()).item() + 1e-300) * 64
            rates, at_noise = [], 0
            for k in range(_HALVINGS):
                r0, r1 = float(remainder[k]), float(remainder[k + 1])
                if r0 <= noise or r1 <= noise:
                    at_noise += 1
                    continue
                rates.append(math.log2(r0 / r1))
            finite = all(math.isfinite(r) for r in remainder.tolist())
            if not finite:
                status, message = Status.NONFINITE, "the remainder is not finite"
            elif not rates:
                status, message = (
                    Status.PASS,
                    "remainder at round-off level for every h (f is locally linear)",
                )
            else:
                # The smallest steps show the asymptotic rate: a wrong gradient may still look
                # quadratic at large h, where the h^2 term dominates a small error.
                tail = sorted(rates[-3:])
                rate = tail[len(tail) // 2]
                status = Status.PASS if rate >= _PASSING_RATE else Status.FAIL
                message = f"observed convergence rate {rate:.2f} (2 expected, 1 means a wrong gradient)"
            reports.append(
                PairReport(
                    output=block.name,
                    input=leaf.name,
                    check=Check.TAYLOR,
                    status=status,
                    mode="taylor",
                    output_shape=list(block.shape),
                    input_shape=list(leaf.shape),
                    dtype=str(leaf.dtype).removeprefix("torch."),
                    taylor_rates=[round(r, 4) for r in rates],
                    elements_checked=len(hs),
                    message=message,
                )
            )
    return reports
