"""What each check did, gathered across xdist workers, and the terminal summary drawn from it.

Records travel from workers to the controller as plain dicts (``config.workeroutput`` only carries
builtins), so a record is a flat dataclass with a lossless ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["LOCAL", "CheckRecord", "Tally", "summary_lines"]

LOCAL = "local"
_LISTED = 5  # fallbacks named one by one before "... and N more"


@dataclass(frozen=True)
class CheckRecord:
    """One ``assert_grads`` call."""

    nodeid: str
    function: str
    where: str  # LOCAL or the server address
    ok: bool
    seconds: float
    kinks: int = 0
    fallback: str = ""  # why a check meant for the server ran locally
    error: str = ""  # why the check could not run at all (exception type and message)
    unreachable: bool = False  # the server could not be reached
    warmup: bool = False  # its process's first check: its time includes loading torch and the engine
    expected_mismatch: bool = False  # expect="mismatch" and the mismatch was found: passed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Tally:
    """Records of this process, plus those reported by finished xdist workers."""

    def __init__(self) -> None:
        self.records: list[CheckRecord] = []

    def add(self, record: CheckRecord) -> None:
        self.records.append(record)

    def dump(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    def load(self, dumped: Iterable[dict[str, Any]]) -> None:
        self.records.extend(CheckRecord.from_dict(d) for d in dumped)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _listed(items: list[str], verbose: bool) -> list[str]:
    """Every item under -v; otherwise the first few and a count of the rest."""
    if verbose or len(items) <= _LISTED:
        return items
    return [*items[:_LISTED], f"  ... and {len(items) - _LISTED} more (-v lists them all)"]


def summary_lines(records: list[CheckRecord], *, verbose: bool = False) -> list[str]:
    """The summary's lines; empty when no check ran (then nothing is printed)."""
    if not records:
        return []
    failed = [r for r in records if not r.ok]
    errors = sum(1 for r in records if r.error)
    kinks = sum(r.kinks for r in records)
    head = f"{_plural(len(records), 'check')} run, {len(failed)} failed"
    if errors:
        head += f" ({errors} could not run)"
    expected = sum(1 for r in records if r.expected_mismatch)
    if expected:
        head += f", {expected} expected mismatch{'' if expected == 1 else 'es'}"
    head += f", {_plural(kinks, 'kink')} seen"
    if kinks:
        head += f" (in {_plural(sum(1 for r in records if r.kinks), 'check')})"
    lines = [head]

    ran = [r for r in records if not r.unreachable]
    where = Counter(r.where for r in ran)
    parts = [f"{n} {'local' if w == LOCAL else 'on ' + w}" for w, n in sorted(where.items())]
    if parts:
        lines.append("where: " + ", ".join(parts))
    down = Counter(r.where for r in records if r.unreachable)
    lines.extend(f"server {w} unreachable: {_plural(n, 'check')} not run" for w, n in sorted(down.items()))

    fallbacks = sorted((r for r in records if r.fallback), key=lambda r: r.nodeid)
    if fallbacks:
        lines.append(f"ran locally, the server cannot run them: {_plural(len(fallbacks), 'check')}")
        lines.extend(_listed([f"  {r.nodeid} ({r.function}: {r.fallback})" for r in fallbacks], verbose))

    # A process's first check pays for importing torch and warming the engine: not the check's cost.
    warm = [r for r in ran if not r.warmup]
    slowest = max(warm or ran, key=lambda r: r.seconds, default=None)
    if slowest is not None:
        where_slow = LOCAL if slowest.where == LOCAL else f"on {slowest.where}"
        label = "slowest" if warm else "slowest (first check, includes warm-up)"
        lines.append(f"{label}: {slowest.seconds:.2f} s {slowest.nodeid} ({slowest.function}, {where_slow})")
    return lines
