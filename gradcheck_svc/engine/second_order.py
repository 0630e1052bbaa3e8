"""Second order: check the Jacobian of the vector-Jacobian product (reverse over reverse).

The check at order 2 is the ordinary check composed on a derived function: ``g(x) = J(x)^T v``
for a fixed, seeded cotangent ``v``, taking the same leaves as ``fn`` and returning one gradient
per leaf. Its analytic Jacobian comes from differentiating the user's backward, its numeric one
from finite differences of ``g``. A backward written with detached or non-differentiable ops
passes at order 1 and fails here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from gradcheck_svc.engine.analytic import func_vjp
from gradcheck_svc.engine.problem import Problem, build_problem

__all__ = ["second_order_problem", "vjp_function"]


def _flat_real(value: torch.Tensor) -> torch.Tensor:
    real = torch.view_as_real(value) if value.is_complex() else value
    return real.reshape(-1)


def vjp_function(problem: Problem, cotangent: torch.Tensor) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``g(*leaf values) -> (J^T v for each leaf)``, each in its leaf's real shape and dtype."""
    use_func = True

    def g(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal use_func
        reals = [_flat_real(v) for v in values]
        grads: list[torch.Tensor | None] | None = None
        if use_func:
            try:
                _, vjp_fn = func_vjp(problem.flat, *reals)
                # a copy each time: a backward may write into its grad_output, every call needs v
                grads = list(vjp_fn(cotangent.clone()))
            except Exception:
                # torch.func cannot trace this function (e.g. an old-style autograd.Function).
                use_func = False
        if grads is None:
            with torch.enable_grad():
                tracked = [r if r.requires_grad else r.detach().requires_grad_(True) for r in reals]
                y = problem.flat(*tracked)
                grads = (
                    list(
                        torch.autograd.grad(
                            y, tracked, cotangent.clone(), create_graph=True, allow_unused=True
                        )
                    )
                    if y.requires_grad
                    else [None] * len(tracked)
                )
        return tuple(
            (torch.zeros_like(r) if grad is None else grad).reshape(
                (*leaf.shape, 2) if leaf.is_complex else leaf.shape
            )
            for grad, r, leaf in zip(grads, reals, problem.leaves, strict=True)
        )

    return g


def second_order_problem(problem: Problem, *, seed: int) -> Problem:
    """The problem of ``vjp_function(problem, v)`` at the same point, outputs named ``grad[leaf]``."""
    generator = torch.Generator().manual_seed(seed + 1)
    device = problem.leaves[0].value.device
    cotangent = torch.randn(problem.n_outputs, generator=generator, dtype=torch.float64).to(device)
    derived, _ = build_problem(
        vjp_function(problem, cotangent),
        [leaf.value for leaf in problem.leaves],
        {},
        input_names=[leaf.name for leaf in problem.leaves],
        device=None,
        upcast=False,
    )
    derived.outputs = [
        dataclasses.replace(block, name=f"grad[{leaf.name}]")
        for block, leaf in zip(derived.outputs, problem.leaves, strict=True)
    ]
    return derived
