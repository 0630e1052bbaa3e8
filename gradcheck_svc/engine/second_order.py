"""Second order: check the Jacobian of the vector-Jacobian product (reverse over reverse).

The derived function is ``g(x) = J(x)^T v`` for a fixed, seeded cotangent ``v``;
its analytic Jacobian comes from differentiating the user's backward, its
numeric one from finite differences of ``g``. A backward written with detached
or non-differentiable ops passes at order 1 and fails here.
"""

from __future__ import annotations

import torch

from gradcheck_svc.engine.problem import OutputBlock, Problem

__all__ = ["SecondOrderProblem", "second_order_problem"]


class SecondOrderProblem(Problem):
    """``flat(reals) = J(reals)^T v``: the gradient of ``v . F`` as a flat float64 vector."""

    inner: Problem
    cotangent: torch.Tensor
    use_func: bool = True

    def flat(self, *reals: torch.Tensor) -> torch.Tensor:
        if self.use_func:
            try:
                _, vjp_fn = torch.func.vjp(self.inner.flat, *reals)
                return torch.cat([g.reshape(-1).to(torch.float64) for g in vjp_fn(self.cotangent)])
            except Exception:
                # torch.func cannot trace this function (e.g. an old-style autograd.Function).
                self.use_func = False
        with torch.enable_grad():
            tracked = [r if r.requires_grad else r.detach().requires_grad_(True) for r in reals]
            y = self.inner.flat(*tracked)
            if not y.requires_grad:
                return torch.cat([torch.zeros_like(r, dtype=torch.float64) for r in tracked])
            grads = torch.autograd.grad(y, tracked, self.cotangent, create_graph=True, allow_unused=True)
        parts = [
            torch.zeros_like(r, dtype=torch.float64) if g is None else g.reshape(-1).to(torch.float64)
            for g, r in zip(grads, tracked, strict=True)
        ]
        return torch.cat(parts)


def second_order_problem(problem: Problem, *, seed: int) -> SecondOrderProblem:
    generator = torch.Generator().manual_seed(seed + 1)
    cotangent = torch.randn(problem.n_outputs, generator=generator, dtype=torch.float64).to(
        problem.leaves[0].value.device
    )
    derived = SecondOrderProblem(
        fn=problem.fn,
        leaves=problem.leaves,
        _spec=problem._spec,
        _template=problem._template,
        _slots=problem._slots,
        _kwargs=problem._kwargs,
    )
    derived.inner = problem
    derived.cotangent = cotangent
    derived.use_func = True
    offset = 0
    blocks = []
    for leaf in problem.leaves:
        shape = (*leaf.shape, 2) if leaf.is_complex else leaf.shape
        blocks.append(OutputBlock(f"grad[{leaf.name}]", tuple(shape), leaf.real_dtype, offset, leaf.size))
        offset += leaf.size
    derived.outputs = blocks
    derived.first_call = None
    return derived
