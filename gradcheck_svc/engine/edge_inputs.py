"""Inputs and outputs a Jacobian cannot be taken over: zero-size tensors, non-finite elements.

* A zero-size input or output has a Jacobian with no entries: the check is trivially ok,
  nothing to compare, and the report says so.
* An input element that is +-inf or NaN has no finite step: its column is never perturbed
  (a step scaled by |x| would be inf and the difference NaN). It is listed in a note. A NaN
  input that makes an output NaN fails the pairs of that input and output as NONFINITE: no
  gradient is defined there. A NaN that ``nansum`` ignores, or +-inf (attention masks,
  ``-inf`` padding), is a legitimate value that is simply left out.
* Outputs autograd marks non-differentiable are skipped (see ``problem``), listed in a note.
* An input fn writes into in place (a buffer it updates, a counter it bumps) is named in a note;
  where the writes make fn's values or its backward change from call to call, the pairs say so
  (every call starts from what the previous one left, so fn is no function of the point alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradcheck_svc.engine.compare import pair_fields
from gradcheck_svc.engine.problem import Leaf, Problem, flat_index
from gradcheck_svc.report import Check, PairReport, Status

__all__ = [
    "empty_pairs",
    "explain_written_inputs",
    "mark_nonfinite_inputs",
    "mark_nonfinite_outputs",
    "note_skipped_outputs",
    "written_input_pairs",
]


def empty_pairs(problem: Problem, mode: str) -> list[PairReport]:
    """Every (output, input) pair of a problem whose Jacobian has no entries, each trivially ok."""
    return [
        PairReport(
            **pair_fields(block, leaf),
            check=Check.REVERSE,
            status=Status.PASS,
            mode=mode,
            message="zero-size tensor: nothing to compare",
        )
        for block in problem.outputs
        for leaf in problem.leaves
    ]


def _where(leaf: Leaf) -> str:
    shown, count = leaf.nonfinite_elements()
    parts = []
    for index, part, value in shown:
        at = f"[{', '.join(str(i) for i in index)}]" if index else ""
        parts.append(f"{leaf.name}{at}{'.' + part if part else ''} = {value}")
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return ", ".join(parts) + more


def mark_nonfinite_inputs(
    problem: Problem, f0: torch.Tensor, pairs: list[PairReport], note: Callable[[str], None]
) -> None:
    """Name the input elements that were not perturbed; a NaN input that reaches an output fails."""
    nan_outputs: set[str] | None = None
    for leaf in problem.leaves:
        if leaf.all_finite:
            continue
        real = leaf.real
        if nan_outputs is None:
            nan_outputs = {block.name for block in problem.outputs if bool(f0[block.rows].isnan().any())}
        where = _where(leaf)
        note(f"not perturbed (no finite step exists there): {where}")
        if not bool(real.isnan().any()):
            continue
        for pair in pairs:
            if pair.input == leaf.name and pair.output in nan_outputs and pair.check != Check.DEVICES:
                pair.status = Status.NONFINITE
                pair.message = f"{leaf.name} holds NaN: no gradient is defined there"


def mark_nonfinite_outputs(problem: Problem, f0: torch.Tensor, pairs: list[PairReport]) -> None:
    """An output that is NaN or infinite at the point has no gradient there to verify: its pairs
    fail as NONFINITE in every mode, even where the backward's NaN agrees with the differences'
    (NaN on both sides would otherwise read as agreement, and a check that verified nothing as ok;
    fast mode's projections may not reach an infinite element at all)."""
    for block in problem.outputs:
        values = f0[block.rows]
        bad = ~torch.isfinite(values)
        if not bool(bad.any()):
            continue
        first = int(bad.nonzero()[0, 0])
        index, part = flat_index(first, block.shape, block.is_complex)
        at = f"{block.name}{index if index else ''}{'.' + part if part else ''}".replace(", ", ",")
        what = "NaN" if bool(values[first].isnan()) else "infinite"
        for pair in pairs:
            if pair.output == block.name and pair.check != Check.DEVICES and not pair.status.failed:
                pair.status = Status.NONFINITE
                pair.message = f"fn's value is {what} at this point ({at}): no gradient is defined there"


def note_skipped_outputs(problem: Problem, note: Callable[[str], None]) -> None:
    if problem.skipped_outputs:
        note("not checked, autograd marks them non-differentiable: " + ", ".join(problem.skipped_outputs))


def _written(names: list[str]) -> str:
    return f"fn writes in place into {', '.join(names)}, so each call starts from what the last one left"


def explain_written_inputs(problem: Problem, pairs: list[PairReport], note: Callable[[str], None]) -> None:
    """Name the inputs fn wrote into; a pair failed as nondeterministic says that was the cause."""
    written = problem.written_inputs()
    if not written and any(pair.status.failed for pair in pairs):
        written = problem.inputs_a_call_writes()  # writes the version counter does not see
    if not written:
        return
    note(_written(written))
    for pair in pairs:
        if pair.status == Status.NONDETERMINISTIC:
            pair.message = f"{_written(written)}: {pair.message}" if pair.message else _written(written)


def written_input_pairs(problem: Problem, mode: str, error: Exception) -> list[PairReport]:
    """Every pair failed as nondeterministic, where fn's writes into its inputs made the backward of
    an earlier call unable to run (autograd refuses a graph whose saved inputs changed since)."""
    cause = _written(problem.written_inputs())
    return [
        PairReport(
            **pair_fields(block, leaf),
            check=Check.REVERSE,
            status=Status.NONDETERMINISTIC,
            mode=mode,
            message=f"{cause}: the backward of an earlier call could not run ({error})",
        )
        for block in problem.outputs
        for leaf in problem.leaves
    ]
