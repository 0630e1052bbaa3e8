"""Progress of long checks in the terminal (``-v``): a line every few seconds, after the first two.

Only the process that owns the terminal writes: xdist workers have none (their output would
interleave with the controller's), so under ``-n`` checks run silently and the summary speaks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["AFTER_SECONDS", "terminal_progress"]

AFTER_SECONDS = 2.0  # checks shorter than this show nothing
EVERY_SECONDS = 2.0


def terminal_progress(reporter: Any) -> Callable[[str, str], Callable[[int, int], None]]:
    """A factory of per-check callbacks writing through pytest's terminal reporter."""

    def for_check(nodeid: str, label: str) -> Callable[[int, int], None]:
        started = time.monotonic()
        last = started

        def progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - started < AFTER_SECONDS or (now - last < EVERY_SECONDS and done < total):
                return
            last = now
            width = 20
            filled = width * done // max(total, 1)
            bar = "#" * filled + "." * (width - filled)
            reporter.write_line(
                f"gradcheck: {nodeid} {label} [{bar}] {done}/{total} columns, {now - started:.1f} s"
            )

        return progress

    return for_check
