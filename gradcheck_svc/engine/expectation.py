"""``expect="mismatch"``: gradients that are deliberately not the derivative of the forward.

A straight-through estimator (round in the forward, identity in the backward) or a gradient
reversal layer has an autograd Jacobian that finite differences must contradict. Such a check
passes when the mismatch is there and fails when the gradients turn out to be true (the trick
was lost in a refactor). Only a FAIL counts as the mismatch: a nondeterministic backward or a
NaN is a problem of its own and still fails.

Applied to the finished ``Report``, so it works the same for a report a server sent back.
"""

from __future__ import annotations

from gradcheck_svc.report import Report, Status

__all__ = ["apply_expectation"]


def apply_expectation(report: Report, expect: str) -> Report:
    """The report judged against what the caller expects ("match" leaves it unchanged)."""
    if expect == "match":
        return report
    mismatched = [p for p in report.pairs if p.status == Status.FAIL]
    other_failures = [p for p in report.pairs if p.status.failed and p.status != Status.FAIL]
    if mismatched and not other_failures:
        names = ", ".join(p.title for p in mismatched)
        note = f"mismatch expected (expect='mismatch') and found: {names}"
        return report.model_copy(update={"ok": True, "notes": [*report.notes, note]})
    if not mismatched:
        note = "expect='mismatch', but autograd agrees with finite differences: the gradients are true"
        return report.model_copy(update={"ok": False, "notes": [*report.notes, note]})
    return report
