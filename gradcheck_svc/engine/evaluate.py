"""Batched evaluation of the flat function, with vmap where the function allows it.

vmap fails on functions that are not "functional" enough (old-style
autograd.Functions, ``.item()``, data-dependent branches, in-place tricks,
random ops). The first failing call switches the problem to a plain loop for
the rest of the check, and the reason is kept for the report.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradcheck_svc.engine.plain_forward import batched_plain_forward
from gradcheck_svc.engine.problem import Problem
from gradcheck_svc.errors import FunctionRaisedError

__all__ = ["Evaluator", "describe"]


def describe(exc: BaseException) -> str:
    """One short line for a user's exception: its type and first sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0][:160]}"


class Evaluator:
    """Evaluates ``problem.flat`` on batches of perturbed leaves."""

    def __init__(self, problem: Problem, on_note: Callable[[str], None]) -> None:
        self.problem = problem
        self.use_vmap = True
        # None: untried; False once a batched direct-forward call was refused or disagreed.
        self.use_plain_forward: bool | None = None
        self._vmap_refusal = ""
        self._note = on_note

    def base(self) -> torch.Tensor:
        with torch.no_grad():
            return self._guarded(lambda: self.problem.flat(*self.problem.base_reals()))

    def leaf_batch(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        """Rows of ``batch`` are flat real values of leaf ``index``; returns (B, n_outputs)."""
        problem = self.problem

        def one(row: torch.Tensor) -> torch.Tensor:
            return problem.flat_replace(index, row)

        with torch.no_grad():
            if self.use_vmap:
                try:
                    return torch.vmap(one)(batch)
                except Exception as exc:  # any vmap incompatibility: fall back, remember why
                    self.use_vmap = False
                    self._vmap_refusal = describe(exc)
            if self.use_plain_forward is not False:
                batched = batched_plain_forward(one, batch, self._machine_eps(index))
                if batched is not None:
                    if self.use_plain_forward is None:
                        self._note("custom autograd.Function forwards batched with vmap, called directly")
                    self.use_plain_forward = True
                    return batched
                self.use_plain_forward = False
                self._note(f"fn does not support vmap ({self._vmap_refusal}); evaluated in a loop")
            return self._guarded(lambda: torch.stack([one(row) for row in batch]))

    def _machine_eps(self, index: int) -> float:
        return torch.finfo(self.problem.leaves[index].real_dtype).eps

    @staticmethod
    def _guarded(call: Callable[[], torch.Tensor]) -> torch.Tensor:
        try:
            return call()
        except Exception as exc:
            raise FunctionRaisedError(
                f"fn raised while evaluating perturbed inputs: {describe(exc)}"
            ) from exc
