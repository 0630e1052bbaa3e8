"""Batched evaluation of the flat function, with vmap where the function allows it.

vmap fails on functions that are not "functional" enough (old-style
autograd.Functions, ``.item()``, data-dependent branches, in-place tricks,
random ops). The first failing call switches the problem to a plain loop for
the rest of the check, and the reason is kept for the report. A batch of a few rows
(``Context``'s ``PLAIN_ROWS``) is evaluated by plain calls from the start: there vmap saves less
than the calls that verify it and size its memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from gradcheck_svc.engine.agreement import within_ulps
from gradcheck_svc.engine.guard import peak_bytes
from gradcheck_svc.engine.plain_forward import batched_plain_forward
from gradcheck_svc.engine.problem import Problem
from gradcheck_svc.errors import CheckError, FunctionRaisedError

_T = TypeVar("_T")

__all__ = ["Evaluator", "describe", "why_not_batched"]

# Reasons torch.vmap gives often, in a few words: (text in the message, what to say).
_KNOWN_REASONS = (
    ("setup_context", "an autograd.Function without setup_context"),
    (".item()", "fn calls .item()"),
    ("data-dependent control flow", "data-dependent control flow"),
    ("Batching rule not implemented", "an op without a batching rule"),
)


def describe(exc: BaseException) -> str:
    """One short line for a user's exception: its type and first sentence."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text.split('. ')[0][:160]}"


def why_not_batched(exc: BaseException) -> str:
    """A few words on why torch.vmap could not run fn: the note is information, not an error."""
    text = str(exc).strip()
    for marker, reason in _KNOWN_REASONS:
        if marker in text:
            return reason
    first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    return first if len(first) <= 60 else first[:57] + "..."


class Evaluator:
    """Evaluates ``problem.flat`` on batches of perturbed leaves."""

    def __init__(self, problem: Problem, on_note: Callable[[str], None]) -> None:
        self.problem = problem
        self.use_vmap = True
        # None: untried; False once a batched direct-forward call was refused or disagreed.
        self.use_plain_forward: bool | None = None
        self._vmap_refusal = ""
        self._note = on_note
        self._vmap_verified = False
        self._measured_base: torch.Tensor | None = None  # f(x) from ``measured_base``

    def base(self) -> torch.Tensor:
        with torch.no_grad():
            return self._guarded(lambda: self.problem.flat(*self.problem.base_reals()))

    def measured_base(self) -> tuple[torch.Tensor, int]:
        """f(x) by a plain call, and the peak bytes that call allocated. The value is kept: it is
        the plain call that verifies vmap on a batch whose last row is the point itself."""
        value, peak = peak_bytes(self.base)
        self._measured_base = value
        return value, peak

    def plain_batch(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        """Rows of ``batch`` evaluated by plain calls, one at a time, as the user's own call was:
        no vmap to verify, no batch memory to size; (B, n_outputs)."""
        problem = self.problem
        with torch.no_grad():
            # A fresh tensor per call: a row view would let storage-level ops read a neighbour.
            return self._guarded(
                lambda: torch.stack([problem.flat_replace(index, row.clone()) for row in batch])
            )

    def plain_outputs(self, index: int, copies: list[torch.Tensor]) -> list[torch.Tensor]:
        """``plain_batch`` of copies of leaf ``index`` already made, as fresh tensors in its shape;
        each output left on its own."""
        problem = self.problem
        with torch.no_grad():
            return self._guarded(lambda: [problem.call_replaced(index, copy) for copy in copies])

    def leaf_batch(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        """Rows of ``batch`` are flat real values of leaf ``index``; returns (B, n_outputs)."""
        problem = self.problem

        def one(row: torch.Tensor) -> torch.Tensor:
            return problem.flat_replace(index, row)

        with torch.no_grad():
            if self.use_vmap:
                try:
                    result = torch.vmap(one)(batch)
                    if self._vmap_verified or self._same_unbatched(index, one, batch, result):
                        return result
                    self.use_vmap = False
                    self._note(
                        "torch.vmap evaluates fn differently from a plain call here (a torch "
                        "batching rule); perturbations evaluated one at a time"
                    )
                except Exception as exc:  # any vmap incompatibility: fall back, remember why
                    self.use_vmap = False
                    self._vmap_refusal = why_not_batched(exc)
            if self.use_plain_forward is not False and self._vmap_refusal:
                batched = batched_plain_forward(one, batch, self._machine_eps(index))
                if batched is not None:
                    if self.use_plain_forward is None:
                        self._note("custom autograd.Function forwards batched with vmap, called directly")
                    self.use_plain_forward = True
                    return batched
                self.use_plain_forward = False
                why = self._vmap_refusal
                self._note(f"perturbations evaluated one at a time: torch.vmap cannot batch fn ({why})")
            # A fresh tensor per call, as the user's own input was: a row view of the batch would
            # let storage-level ops (as_strided) read a neighbouring row.
            return self._guarded(lambda: torch.stack([one(row.clone()) for row in batch]))

    def _same_unbatched(
        self,
        index: int,
        one: Callable[[torch.Tensor], torch.Tensor],
        batch: torch.Tensor,
        result: torch.Tensor,
    ) -> bool:
        """Once per check: the last row of the first batch, evaluated by a plain call, must match.

        torch has had wrong batching rules (``roll`` of a 0-d tensor mixes the batch). A random
        fn differs from itself too: that is nondeterminism, reported elsewhere, not vmap's fault.
        """
        self._vmap_verified = True
        eps = max(torch.finfo(leaf.real_dtype).eps for leaf in self.problem.leaves)

        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            return within_ulps(a, b, eps, both=True)

        last = batch[-1]
        plain = self._measured_base
        if plain is None or not torch.equal(last, self.problem.leaves[index].real.to(last.dtype)):
            plain = self._guarded(lambda: one(last.clone()))
        if same(plain, result[-1]):
            return True
        return not same(plain, self._guarded(lambda: one(batch[-1].clone())))

    def _machine_eps(self, index: int) -> float:
        return torch.finfo(self.problem.leaves[index].real_dtype).eps

    @staticmethod
    def _guarded(call: Callable[[], _T]) -> _T:
        try:
            return call()
        except CheckError:  # already says what went wrong (an output that changed shape, a limit)
            raise
        except Exception as exc:
            raise FunctionRaisedError(
                f"fn raised while evaluating perturbed inputs: {describe(exc)}"
            ) from exc
