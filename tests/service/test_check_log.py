"""A check's log line: one per check, with its status, written once its answer has gone out (the
client does not wait for the log)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from gradcheck_svc.client import Client
from gradcheck_svc.errors import ServiceError

LOGGER = logging.getLogger("gradcheck_svc.server")


class _CheckLines(logging.Handler):
    """Collects the server's ``check id=`` lines; while ``hold`` is clear, writing one stalls, as a
    slow log destination would."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.hold = threading.Event()
        self.hold.set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("check id="):
            self.hold.wait(60)
            self.lines.append(message)

    def wait_for(self, count: int, seconds: float = 20.0) -> list[str]:
        deadline = time.monotonic() + seconds
        while len(self.lines) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.lines


@contextmanager
def check_lines() -> Iterator[_CheckLines]:
    handler = _CheckLines()
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        handler.hold.set()
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


def test_the_answer_does_not_wait_for_the_log_line(address: str) -> None:
    with check_lines() as log, Client(address, timeout=30) as client:
        log.hold.clear()  # the line cannot be written until the test lets it
        report = client.check("x**2", x=torch.tensor(9.0, dtype=torch.float64))
        assert report.ok and report.pairs[0].worst[0].analytic == pytest.approx(18.0)
        assert log.lines == []
        log.hold.set()
        lines = log.wait_for(1)
    assert len(lines) == 1
    assert all(f in lines[0] for f in ("function='x**2'", "points=1", "ok=true", "status=OK", "duration="))


def test_a_refused_check_logs_its_status_once(address: str) -> None:
    with check_lines() as log, Client(address, timeout=30) as client:
        with pytest.raises(ServiceError) as info:
            client.check("x.__class__", x=torch.tensor(1.0))
        assert info.value.code == "INVALID_ARGUMENT"
        lines = log.wait_for(1)
        time.sleep(0.2)  # a second line, if there were one, would come as soon
    assert len(log.lines) == 1 and "status=INVALID_ARGUMENT" in lines[0] and "ok=-" in lines[0]
