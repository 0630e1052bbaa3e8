"""Progress of a running check, in finite-difference columns done out of the total.

The engine advances it between chunks (each chunk is one batched evaluation); the caller's
callback, ``progress(done, total)``, decides what to show and how often.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "ProgressFn"]

ProgressFn = Callable[[int, int], None]


class Progress:
    """Columns done out of ``total``; ``total`` 0 means unknown (nothing is reported)."""

    def __init__(self, callback: ProgressFn, total: int) -> None:
        self._callback = callback
        self.total = max(0, total)
        self.done = 0

    def advance(self, columns: int) -> None:
        if self.total <= 0 or columns <= 0:
            return
        self.done = min(self.total, self.done + columns)
        self._callback(self.done, self.total)

    def finish(self) -> None:
        if self.total > 0 and self.done < self.total:
            self.done = self.total
            self._callback(self.done, self.total)
