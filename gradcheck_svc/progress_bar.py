"""A progress bar on a text stream for checks that take a while (the CLI's ``check``).

Silent for the first ``after`` seconds, so quick checks print nothing; then a bar with columns
done / total, redrawn in place on a terminal and as a line every few seconds elsewhere (logs).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``progress(done, total)`` callback drawing ``label [#####.....] done/total columns, 3.1 s``."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        after: float = 2.0,
        every: float = 2.0,
        width: int = 30,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.after, self.every, self.width = after, every, width
        self.started = time.monotonic()
        self._last = -float("inf")
        self._drawn = False
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        finished = done >= total
        if elapsed < self.after or (not self._tty and now - self._last < self.every and not finished):
            return
        self._last = now
        filled = self.width * done // max(total, 1)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{total} columns, {elapsed:.1f} s"
        )
        self.stream.write(("\r" + line) if self._tty else line + "\n")
        self._drawn = True
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line on a terminal (nothing when it was never drawn)."""
        if self._drawn and self._tty:
            self.stream.write("\n")
            self.stream.flush()
