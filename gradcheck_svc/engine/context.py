"""Per-check state shared by the drivers: problem, evaluators, options, limits, notes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradcheck_svc.engine.analytic import Analytic
from gradcheck_svc.engine.compare import Tolerance
from gradcheck_svc.engine.evaluate import Evaluator
from gradcheck_svc.engine.numeric import NODES, defaults_for
from gradcheck_svc.engine.problem import Leaf, OutputBlock, Problem
from gradcheck_svc.engine.progress import Progress
from gradcheck_svc.errors import CheckCancelledError, LimitExceededError
from gradcheck_svc.options import CheckOptions

__all__ = ["Context"]

_CHUNK_BYTES = 192 * 2**20  # memory for one batch of perturbed inputs and their outputs


@dataclass
class Context:
    problem: Problem
    options: CheckOptions
    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    progress: Progress | None = None  # advanced by every batch of perturbed columns
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    evaluator: Evaluator = field(init=False)
    analytic: Analytic = field(init=False)
    f0: torch.Tensor = field(init=False)
    _base_rechecked: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.evaluator = Evaluator(self.problem, self.note)
        self.analytic = Analytic(self.problem, self.note)
        first = self.problem.first_call
        if first is None:
            self.f0 = self.evaluator.base()
        else:
            self.f0 = first[0].detach()
            self.analytic.adopt_graph(*first)

    def evaluate(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        """Evaluate a batch of perturbed copies of leaf ``index``.

        The first batch of a check also carries the unperturbed point: a second evaluation of
        f(x), nearly free inside the batch, compared with the first to catch a nondeterministic fn.
        """
        if self.progress is not None:
            self.progress.advance(batch.shape[0] // len(NODES))
        if self._base_rechecked:
            return self.evaluator.leaf_batch(index, batch)
        self._base_rechecked = True
        base = self.problem.leaves[index].real.detach().to(batch.dtype).unsqueeze(0)
        evaluated = self.evaluator.leaf_batch(index, torch.cat([batch, base]))
        self.analytic.forward_values.append(evaluated[-1])
        return evaluated[:-1]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def poll(self) -> None:
        """Called between chunks: honour the deadline and cancellation."""
        if self.cancelled is not None and self.cancelled():
            raise CheckCancelledError("the check was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LimitExceededError("deadline exceeded: the check did not finish in the time allowed")

    def timed(self, key: str, start: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def eps(self, leaf: Leaf) -> float:
        return self.options.eps if self.options.eps is not None else defaults_for(leaf.dtype).eps

    @property
    def machine_eps(self) -> float:
        return defaults_for(*(o.dtype for o in self.problem.outputs)).machine_eps

    def tolerance(self, output: OutputBlock, leaf: Leaf) -> Tolerance:
        d = defaults_for(output.dtype, leaf.dtype)
        o = self.options
        return Tolerance(
            atol=o.atol,
            atol_factor=d.atol,
            rtol=o.rtol if o.rtol is not None else d.rtol,
            bars=o.error_bars,
            kinks_fail=o.kinks == "fail",
            slack=o.nondet_tol,
        )

    def chunk_size(self, leaf: Leaf) -> int:
        if self.options.chunk_size is not None:
            return min(self.options.chunk_size, leaf.size)
        per_column = 3 * (leaf.size + self.problem.n_outputs) * 8 * 2  # inputs, outputs, intermediates
        return max(1, min(leaf.size, _CHUNK_BYTES // per_column))

    def check_limits(self, jacobian_entries: int, evaluations: int) -> None:
        o = self.options
        if o.max_jacobian_entries is not None and jacobian_entries > o.max_jacobian_entries:
            raise LimitExceededError(
                f"the check needs {jacobian_entries} Jacobian entries, over the limit of "
                f"{o.max_jacobian_entries}; use mode='fast' or smaller inputs"
            )
        if o.max_evaluations is not None and evaluations > o.max_evaluations:
            raise LimitExceededError(
                f"the check needs {evaluations} function evaluations, over the limit of {o.max_evaluations}"
            )
