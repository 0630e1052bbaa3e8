"""Per-check state shared by the drivers: problem, evaluators, options, limits, notes."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradcheck_svc.engine.agreement import FEW_VALUES
from gradcheck_svc.engine.analytic import Analytic
from gradcheck_svc.engine.compare import Tolerance
from gradcheck_svc.engine.evaluate import Evaluator
from gradcheck_svc.engine.external import ExternalFunction
from gradcheck_svc.engine.guard import batch_bytes, batch_rows
from gradcheck_svc.engine.numeric import NODES
from gradcheck_svc.engine.numeric import defaults_for as _defaults_for
from gradcheck_svc.engine.problem import Leaf, OutputBlock, Problem
from gradcheck_svc.engine.progress import Progress
from gradcheck_svc.engine.reference import Reference, narrowed_terms, rounded_terms
from gradcheck_svc.errors import CheckCancelledError, LimitExceededError
from gradcheck_svc.options import CheckOptions

__all__ = ["Context", "Notes"]

_CHUNK_BYTES = 192 * 2**20  # memory for one batch of perturbed inputs and their outputs
_ROW_BYTES = 128 * 2**20  # memory for one batch of cotangents through the backward
# A low-precision backward against float64 differences: units of its machine epsilon allowed,
# relative to the element and to the block's largest value.
_ROUNDING_RTOL = 16.0
_ROUNDING_ATOL = 32.0
_FORWARD_ROUNDING = 4.0  # times the forward's relative rounding, per output element
# An output whose low-precision value strays this far (relative) from the float64 one, or is
# exactly 0, may be a cancellation: the size of its terms is measured (``_cancelled_terms``).
_CANCELLED_GAP = 2.0**-10
# Units of float64 rounding of those terms, over the step, allowed the float64 run of the
# backward: the float64 differences of a cancellation carry that much rounding.
_WIDE_CANCELLED_ULPS = 8.0
# A float64 output block whose values are at most this many float32 ulps of its inputs' scale may
# be a cancellation of terms of that size: a float32 copy measures them (``_narrowed_terms``).
_NARROW_CANCELLED_ULPS = 1.0
# A batch of at most this many perturbed copies (scalar inputs, one projection in fast mode) of a
# problem of at most PLAIN_ELEMENTS input and output elements is evaluated by plain calls, one at
# a time: that many calls of fn cost less than a vmap call plus the plain call that verifies it and
# the one that measures its memory. In larger problems, one batched call shares the work of the
# copies (a matrix read once for all of them) and vmap stays, once that memory is measured: before
# it, the measuring call and vmap's own cost more than the few plain calls (fast mode's one batch
# per leaf, 3 nodes and f(x), of sin(tanh(W x)) at N=300 to 3000 takes less time by plain calls).
PLAIN_ROWS = 4
PLAIN_ELEMENTS = 512
# Cotangents this few go through the backward without sizing: at most this many backward
# passes' memory at once (the rows of a scalar or tiny output).
_UNSIZED_ROWS = 4


# The defaults of a few dtypes, asked several times by every check: frozen values, looked up once.
defaults_for = functools.lru_cache(maxsize=64)(_defaults_for)


def _relative_gap(low: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    if low.numel() <= FEW_VALUES:
        gaps = [_gap(a, b) for a, b in zip(low.tolist(), wide.tolist(), strict=True)]
        return torch.tensor(gaps, dtype=wide.dtype, device=wide.device)
    gap = (low - wide).abs() / wide.abs()
    return torch.where(low == wide, 0.0, gap).nan_to_num(nan=1.0, posinf=1.0).clamp(max=1.0)


def _gap(low: float, wide: float) -> float:
    """``_relative_gap`` of one element: |low - wide| / |wide|, 0 where equal, at most 1 (NaN and
    inf read 1)."""
    if low == wide:
        return 0.0
    difference, magnitude = abs(low - wide), abs(wide)
    if magnitude == 0:
        return 1.0  # a positive difference over 0 (inf), or NaN
    gap = difference / magnitude
    return 1.0 if math.isnan(gap) or gap > 1.0 else gap


class Notes(list[str]):
    """A check's notes in order, each once. The parts of a check get ``add``, not a bound method
    of the Context that holds them: that would make every check a reference cycle, garbage left
    to the cyclic collector (whose passes cost small checks a tenth of their time)."""

    def add(self, text: str) -> None:
        if text not in self:
            self.append(text)


def _largest_finite(t: torch.Tensor) -> float:
    """max |t| over its finite elements (0 for none); a few are read as Python floats."""
    if t.numel() <= FEW_VALUES:
        return max((abs(v) for v in t.reshape(-1).tolist() if math.isfinite(v)), default=0.0)
    return float(t.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max())


@dataclass
class Context:
    """``problem`` is what the analytic side differentiates, in the user's dtype; the numeric
    side differentiates ``reference.problem`` (the same, or a float64 copy: see reference.py)."""

    problem: Problem
    options: CheckOptions
    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None
    reference: Reference | None = None  # None: the numeric side differentiates ``problem``
    progress: Progress | None = None  # advanced by every batch of perturbed columns
    notes: Notes = field(default_factory=Notes)
    timings: dict[str, float] = field(default_factory=dict)
    evaluator: Evaluator = field(init=False)
    analytic: Analytic = field(init=False)
    # The user's backward run on the float64 copy, when the numeric side is one (reference.py).
    wide_analytic: Analytic | None = field(init=False)
    # Per output element, how far the user's forward strays from the float64 one, relative
    # (at most 1): where rounding spoils f, it spoils the backward built on the same
    # intermediates as much, whatever the size of the derivative.
    forward_rounding: torch.Tensor | None = field(init=False)
    f0: torch.Tensor = field(init=False)  # f(x) in the user's dtype (as float64 values)
    numeric_f0: torch.Tensor = field(init=False)  # f(x) of the numeric side
    # A second evaluation of f(x) by the numeric side, to detect a nondeterministic forward.
    numeric_repeats: list[torch.Tensor] = field(default_factory=list, init=False)
    # Fast mode: the factor on the step along a random direction (see ``fast.run_fast``), and
    # how many projections' one-sided differences were apart (a kink within the step).
    direction_scale: float = field(default=1.0, init=False)
    rough_projections: int = field(default=0, init=False)
    # ... the differences along the directions each projection summed (``fast.kinked_outputs``
    # reads them), and the cotangents' mask that leaves out output elements a kink made rough.
    fast_parts: list[tuple[float, torch.Tensor]] = field(default_factory=list, init=False)
    cotangent_mask: torch.Tensor | None = field(default=None, init=False)
    _eval_bytes: int | None = field(default=None, init=False)
    _eval_seconds: float = field(default=0.0, init=False)
    _plain_calls: bool = field(default=False, init=False)  # see PLAIN_ROWS
    _external: bool = field(default=False, init=False)  # fn is an ExternalFunction
    # ``tolerance`` per block (its dtypes and offsets): asked for every pair, several times, and
    # fixed by the options, the dtypes and the block's values.
    _tolerances: dict[tuple[torch.dtype, torch.dtype, int, int], Tolerance] = field(
        default_factory=dict, init=False
    )
    # ``_cancelled_terms``' measurement, per output element: made only when an output asks for
    # it; and its answer per output block (asked by both tolerances of every pair)
    _rounded_terms: torch.Tensor | None = field(default=None, init=False)
    _cancelled: dict[int, float] = field(default_factory=dict, init=False)
    _steps: dict[torch.dtype, float] = field(default_factory=dict, init=False)  # ``eps`` per leaf dtype

    def __post_init__(self) -> None:
        self.analytic = Analytic(self.problem, self.notes.add)
        first = self.problem.first_call
        if first is None:
            self.f0 = Evaluator(self.problem, self.notes.add).base()
        else:
            self.f0 = first[0].detach()
            self.analytic.adopt_graph(*first, self.problem.first_root)
        if self.reference is None:
            self.reference = Reference(self.problem, "", "")
        numeric = self.reference.problem
        self.evaluator = Evaluator(numeric, self.notes.add)
        # An external function's every call is a round trip, which its vmap rule batches into one.
        self._external = isinstance(numeric.fn, ExternalFunction)
        self._plain_calls = numeric.n_inputs + numeric.n_outputs <= PLAIN_ELEMENTS and not self._external
        self.wide_analytic = None
        self.forward_rounding = None
        if numeric is self.problem:
            self.numeric_f0 = self.f0
        else:
            self.wide_analytic = Analytic(numeric, self.notes.add)
            if numeric.first_call is not None:
                self.numeric_f0 = numeric.first_call[0].detach()
                self.wide_analytic.adopt_graph(*numeric.first_call, numeric.first_root)
            else:
                self.numeric_f0 = self.evaluator.base()
            self.forward_rounding = _relative_gap(self.f0, self.numeric_f0)

    @property
    def numeric_problem(self) -> Problem:
        assert self.reference is not None
        return self.reference.problem

    def evaluate(self, index: int, batch: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        """Evaluate a batch of perturbed copies of leaf ``index`` of the numeric problem.

        ``columns`` is how many Jacobian columns the batch covers, for progress (default: one
        per finite-difference node triple; grouped perturbations cover more).
        The first batch of a check also carries the unperturbed point: a second evaluation of
        f(x), nearly free inside the batch, compared with the first to catch a nondeterministic fn.
        """
        if self.progress is not None:
            self.progress.advance(batch.shape[0] // len(NODES) if columns is None else columns)
        if self.numeric_repeats:
            return self._leaf_batch(index, batch)
        base = self.numeric_problem.leaves[index].real.detach().to(batch.dtype).unsqueeze(0)
        evaluated = self._leaf_batch(index, torch.cat([batch, base]))
        self.numeric_repeats.append(evaluated[-1])
        return evaluated[:-1]

    def evaluate_values(self, index: int, rows: list[list[float]], columns: int) -> list[list[float]] | None:
        """``evaluate`` of a few perturbed copies of leaf ``index`` given as Python floats, their
        outputs as lists: the same plain calls ``evaluate`` makes for so few rows (the point itself
        among them on the first batch), without a batch tensor to build, stack and split. None
        where ``evaluate`` would not call fn row by row."""
        if not self.plain_copies(index, len(rows)):
            return None
        leaf = self.numeric_problem.leaves[index]
        # A fresh tensor per call, as ``Evaluator.plain_batch`` passes.
        outputs = self.evaluate_copies(index, [leaf.fresh(row) for row in rows], columns)
        return [out.tolist() for out in outputs]

    def plain_copies(self, index: int, rows: int) -> bool:
        """Whether ``evaluate`` calls fn row by row on ``rows`` copies of leaf ``index`` (a real
        leaf): then ``evaluate_copies`` makes the same calls."""
        base = not self.numeric_repeats
        return (
            not self.numeric_problem.leaves[index].is_complex
            and rows + base <= PLAIN_ROWS
            and (self._plain_calls or (self._eval_bytes is None and not self._external))
        )

    def evaluate_copies(self, index: int, copies: list[torch.Tensor], columns: int) -> list[torch.Tensor]:
        """``evaluate`` of fresh perturbed copies of leaf ``index`` in its own shape, where
        ``plain_copies`` allows: each call's flat outputs, with no batch to stack and split."""
        base = not self.numeric_repeats
        if self.progress is not None:
            self.progress.advance(columns)
        if base:
            copies = [*copies, self.numeric_problem.leaves[index].as_called.clone()]
        outputs = self.evaluator.plain_outputs(index, copies)
        if base:
            self.numeric_repeats.append(outputs.pop())
        return outputs

    @property
    def eval_bytes(self) -> int:
        """Peak bytes of one evaluation of fn, measured once: every perturbed copy in a batch
        carries its own intermediates, which input and output sizes alone do not show."""
        if self._eval_bytes is None:
            started = time.perf_counter()
            self._eval_bytes = self.evaluator.measured_base()[1]
            self._eval_seconds = time.perf_counter() - started
        return self._eval_bytes

    def _leaf_batch(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        """Evaluate in slices whose copies, intermediates included, fit the batch memory."""
        if batch.shape[0] <= PLAIN_ROWS and (
            self._plain_calls or (self._eval_bytes is None and not self._external)
        ):
            return self.evaluator.plain_batch(index, batch)
        rows = batch_rows(self.eval_bytes, self._eval_seconds, _CHUNK_BYTES)
        if batch.shape[0] <= rows:
            return self.evaluator.leaf_batch(index, batch)
        return torch.cat([self.evaluator.leaf_batch(index, part) for part in torch.split(batch, rows)])

    def note(self, text: str) -> None:
        self.notes.add(text)

    def poll(self) -> None:
        """Called between chunks: honour the deadline and cancellation."""
        if self.cancelled is not None and self.cancelled():
            raise CheckCancelledError("the check was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise LimitExceededError("deadline exceeded: the check did not finish in the time allowed")

    def timed(self, key: str, start: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def eps(self, leaf: Leaf) -> float:
        """The relative step for ``leaf`` (a leaf of the numeric problem): its dtype's, or that of
        the outputs where even the most precise of them is less precise (``x.double()`` in,
        ``.float()`` out): a float64 step over float32 values has rounding of 2^-7 relative."""
        if self.options.eps is not None:
            return self.options.eps
        found = self._steps.get(leaf.dtype)
        if found is None:
            outputs = [defaults_for(o.dtype) for o in self.numeric_problem.outputs]
            own = defaults_for(leaf.dtype)
            finest = min(outputs, key=lambda d: d.machine_eps, default=own)
            found = self._steps[leaf.dtype] = max(own, finest, key=lambda d: d.machine_eps).eps
        return found

    @functools.cached_property
    def machine_eps(self) -> float:
        """Unit roundoff of the user's outputs: the precision the analytic side works in."""
        return defaults_for(*(o.dtype for o in self.problem.outputs)).machine_eps

    @functools.cached_property
    def numeric_machine_eps(self) -> float:
        """Unit roundoff of the numeric side's outputs."""
        return defaults_for(*(o.dtype for o in self.numeric_problem.outputs)).machine_eps

    def tolerance(self, output: OutputBlock, leaf: Leaf) -> Tolerance:
        """The tolerance of the user's analytic values against the numeric side.

        A low-precision backward may differ from the exact derivative by several units of its
        dtype, of the element and of the block it sums from (an ulp of the terms, not of the
        result, where they cancel): at least ``_ROUNDING_RTOL`` and ``_ROUNDING_ATOL`` units,
        whether the differences are float64 or in the dtype (their error bars cover their own
        rounding, not the backward's). With a float64 reference, small bugs below that are the
        float64 run's to catch (``wide_tolerance``). In float64 both floors are below the defaults.
        """
        key = (output.dtype, leaf.dtype, output.offset, leaf.offset)
        found = self._tolerances.get(key)
        if found is None:
            d = defaults_for(output.dtype, leaf.dtype)
            o = self.options
            rtol = max(d.rtol, _ROUNDING_RTOL * d.machine_eps)
            atol_factor = max(d.atol, _ROUNDING_ATOL * d.machine_eps)
            found = self._tolerances[key] = Tolerance(
                atol=o.atol,
                atol_factor=atol_factor,
                rtol=o.rtol if o.rtol is not None else rtol,
                bars=o.error_bars,
                kinks_fail=o.kinks == "fail",
                slack=o.nondet_tol
                + _ROUNDING_ATOL * d.machine_eps * self._cancelled_scale(output, leaf)
                + self._float64_cancellation(output, leaf),
            )
        return found

    def _float64_cancellation(self, output: OutputBlock, leaf: Leaf) -> float:
        """A float64 check of an output that is a cancellation (its value rounding of terms that
        cancel, ``F.batch_norm(x).sum(0)``): its differences carry the rounding of those terms
        over the step, which neither their error bars (power-of-two steps scale the rounding with
        the step) nor the block's scale (about 0) allow. That rounding, ``_WIDE_CANCELLED_ULPS``
        units at the terms' size over the step (the analytic side's rounding of the same terms,
        over |x| rather than the step, is less), where a float32 copy measures the terms; 0
        elsewhere, unmeasured: outputs not of float64 inputs and outputs, or not small."""
        if self.reference is not None and self.reference.problem is not self.problem:
            return 0.0
        if output.dtype != torch.float64 or leaf.dtype != torch.float64:
            return 0.0
        wide = defaults_for(torch.float64)
        return (
            _WIDE_CANCELLED_ULPS
            * wide.machine_eps
            * self._narrowed_terms(output)
            / (self.options.eps or wide.eps)
        )

    def _narrowed_terms(self, output: OutputBlock) -> float:
        found = self._cancelled.get(output.offset)
        if found is not None:
            return found
        inputs = max((_largest_finite(leaf.real) for leaf in self.problem.leaves), default=0.0)
        small = _NARROW_CANCELLED_ULPS * defaults_for(torch.float32).machine_eps * max(inputs, 1.0)
        found = 0.0
        if _largest_finite(self.f0[output.rows]) <= small:
            if self._rounded_terms is None:
                self._rounded_terms = narrowed_terms(self.problem, self.options.seed)
            found = _largest_finite(self._rounded_terms[output.rows])
        self._cancelled[output.offset] = found
        return found

    def _cancelled_scale(self, output: OutputBlock, leaf: Leaf) -> float:
        """The scale of a derivative from the values around it, |f| / max(|x|, 1) over the block:
        a low-precision backward rounds the terms it sums at that scale even where they cancel to
        a zero derivative (an input a normalisation or a softmax's sum is invariant to), which the
        block's own scale (zero) does not allow. Only with a float64 reference: its run of the
        backward is still held to the block's own scale, so no bug hides under this floor."""
        if self.wide_analytic is None or self.forward_rounding is None:
            return 0.0
        # computed once per block: ``tolerance`` keeps what it makes
        terms = max(_largest_finite(self.f0[output.rows]), self._cancelled_terms(output))
        return terms / max(_largest_finite(leaf.real), 1.0)

    def _cancelled_terms(self, output: OutputBlock) -> float:
        """Where ``output`` is a cancellation (its low-precision value mostly rounding, or exactly
        0), the size of the terms that cancel, measured near x (``reference.rounded_terms``): its
        |f| says nothing of them (``(x - x.mean()).sum() * x.sum()``). 0 elsewhere, unmeasured."""
        if self.forward_rounding is None:
            return 0.0
        found = self._cancelled.get(output.offset)
        if found is None:
            found = self._cancelled[output.offset] = self._measured_terms(output.rows)
        return found

    def _measured_terms(self, rows: slice) -> float:
        assert self.forward_rounding is not None
        if (
            _largest_finite(self.f0[rows]) > 0
            and _largest_finite(self.forward_rounding[rows]) < _CANCELLED_GAP
        ):
            return 0.0
        if self._rounded_terms is None:
            self._rounded_terms = rounded_terms(self.problem, self.numeric_problem, self.options.seed)
        return _largest_finite(self._rounded_terms[rows])

    def rounding_allowance(self, rows: torch.Tensor | slice, numeric: torch.Tensor) -> torch.Tensor | None:
        """Extra tolerance of the user's analytic values in output ``rows`` (numeric block
        ``(m, c)``) for the rounding of the forward they share: None without a float64 reference."""
        if self.forward_rounding is None:
            return None
        return _FORWARD_ROUNDING * self.forward_rounding[rows].unsqueeze(1) * numeric.abs()

    def wide_tolerance(self, output: OutputBlock, leaf: Leaf) -> Tolerance:
        """The tolerance of the float64 run of the user's backward against float64 differences:
        the unit roundoff of the user's dtype (half its machine epsilon), relative and of the
        block's scale. Code exact to the precision it is written for passes; a bug that the
        dtype's rounding hides on the other comparison does not."""
        unit = defaults_for(output.dtype, leaf.dtype).machine_eps / 2
        o = self.options
        wide = defaults_for(torch.float64)
        # a cancelling output's float64 differences round at the scale of its terms, over the step
        cancelled = (
            _WIDE_CANCELLED_ULPS * wide.machine_eps * self._cancelled_terms(output) / (o.eps or wide.eps)
        )
        return Tolerance(
            atol=o.atol,
            atol_factor=unit,
            rtol=o.rtol if o.rtol is not None else unit,
            bars=o.error_bars,
            kinks_fail=o.kinks == "fail",
            slack=o.nondet_tol + cancelled,
        )

    def screen_tolerance(self) -> Tolerance:
        """Fast mode's tolerance for the float64 run of the backward: that of a float64 check.

        A projection dilutes an error of a few elements among all the others, so the screen is
        as strict as float64 allows; a pair it fails is re-checked element by element, with the
        tolerances of the user's dtype, and that verdict stands.
        """
        d = defaults_for(torch.float64)
        o = self.options
        return Tolerance(
            atol=o.atol,
            atol_factor=d.atol,
            rtol=o.rtol if o.rtol is not None else d.rtol,
            bars=o.error_bars,
            kinks_fail=o.kinks == "fail",
            slack=o.nondet_tol,
        )

    def rows_per_backward(self, n_inputs: int, limit: int) -> int:
        """Cotangents per batched backward over ``n_inputs`` input elements, at most ``limit``:
        a backward holds about three forward peaks."""
        if limit <= _UNSIZED_ROWS:
            return max(1, limit)
        per_row = max(1, 8 * (n_inputs + self.problem.n_outputs), 3 * self.eval_bytes)
        return max(1, min(limit, batch_bytes(_ROW_BYTES) // per_row))

    def chunk_size(self, leaf: Leaf) -> int:
        if self.options.chunk_size is not None:
            return min(self.options.chunk_size, leaf.size)
        per_column = max(3 * (leaf.size + self.problem.n_outputs) * 8 * 2, self.eval_bytes)
        return max(1, min(leaf.size, batch_bytes(_CHUNK_BYTES) // per_column))

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
