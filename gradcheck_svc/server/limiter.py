"""Bounded concurrency: a fixed number of check slots, never a queue.

Unary checks take a slot or are turned away at once (RESOURCE_EXHAUSTED); CheckStream items wait
for one, but a stream has at most ``stream_window`` items outstanding, so waiting is bounded too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["ByteBudget", "CheckSlots"]


class CheckSlots:
    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._cond = threading.Condition()

    def try_acquire(self) -> bool:
        with self._cond:
            if self._free == 0:
                return False
            self._free -= 1
            return True

    def acquire(self, *, give_up: Callable[[], bool], poll: float = 0.05) -> bool:
        """Wait for a slot; return False as soon as ``give_up()`` turns true."""
        with self._cond:
            while self._free == 0:
                if give_up():
                    return False
                self._cond.wait(poll)
            self._free -= 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._free >= self.size:
                raise RuntimeError("released a check slot that was not taken")
            self._free += 1
            self._cond.notify()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self.size - self._free


class ByteBudget:
    """Bytes of requests being decoded and checked at once, server-wide: each large request holds
    a copy or three of its tensors (the parsed message, the decoded tensors, the copy a worker
    process is sent), so without a cap many near-limit requests multiply the memory they take."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._used = 0
        self._cond = threading.Condition()

    def try_take(self, amount: int) -> bool:
        """Take ``amount``; a request alone on the server always fits, however large."""
        with self._cond:
            if self._used and self._used + amount > self.size:
                return False
            self._used += amount
            return True

    def take(self, amount: int, *, give_up: Callable[[], bool], poll: float = 0.05) -> bool:
        """Wait until ``amount`` fits and take it; return False as soon as ``give_up()`` turns true."""
        with self._cond:
            while self._used and self._used + amount > self.size:
                if give_up():
                    return False
                self._cond.wait(poll)
            self._used += amount
            return True

    def hold(self, amount: int, uncounted: int, *, give_up: Callable[[], bool]) -> int | None:
        """Wait for room and take ``amount`` (nothing for at most ``uncounted`` bytes); returns what
        was taken, for ``give_back``, or None once ``give_up()`` turned true first."""
        if amount <= uncounted:
            return 0
        return amount if self.take(amount, give_up=give_up) else None

    def give_back(self, amount: int) -> None:
        with self._cond:
            self._used -= amount
            self._cond.notify_all()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used
