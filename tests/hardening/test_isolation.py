"""Operator functions run in worker processes: one that never returns is killed and its slot freed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import service_test_ops
import torch
from service_servers import Running, start_server

from gradcheck_svc.client import Client, Registered, build_request
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64


@pytest.fixture(scope="module")
def guarded() -> Iterator[Running]:
    running = start_server(
        replica_name="guarded", max_concurrent_checks=1, max_check_seconds=3.0, kill_after_seconds=0.5
    )
    assert running.server.service.workers is not None
    running.server.service.workers.warm_up()  # the fork server's first start imports torch
    yield running
    running.server.stop(grace=0)


def x64(value: float = 2.0) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def calls_stop_growing(within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = service_test_ops.calls["slow_square"]
        time.sleep(0.3)
        if service_test_ops.calls["slow_square"] == before:
            return True
    return False


def wait_for_a_ready_worker(running: Running) -> None:
    pool = running.server.service.workers
    assert pool is not None
    deadline = time.monotonic() + 20
    while pool.idle == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.idle >= 1


def wait_idle(running: Running) -> None:
    deadline = time.monotonic() + 5
    while running.server.service.slots.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running.server.service.slots.in_flight == 0


def test_a_function_that_never_returns_is_killed_and_its_slot_freed(guarded: Running) -> None:
    pool = guarded.server.service.workers
    assert pool is not None
    killed = pool.killed
    service_test_ops.reset()
    with Client(guarded.address, timeout=30) as c:
        started = time.monotonic()
        with pytest.raises(ServiceError) as info:
            c.check_registered("service_test_ops:never_returns", x=x64())
        elapsed = time.monotonic() - started
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "max_check_seconds" in str(info.value) and "worker process was killed" in str(info.value)
        assert 3.0 <= elapsed < 8.0
        assert pool.killed == killed + 1
        assert calls_stop_growing()  # the loop really stopped: its process is gone
        wait_idle(guarded)
        wait_for_a_ready_worker(guarded)  # a replacement was started in the background
        # The single slot is free again: operator functions and expressions both run.
        assert c.check_registered("service_test_ops:slow_square", x=x64(), params={"delay": 0.0}).ok
        assert c.check("x**2", x=x64()).ok


def test_a_function_that_kills_its_process_leaves_the_server_unharmed(guarded: Running) -> None:
    with Client(guarded.address, timeout=30) as c:
        with pytest.raises(ServiceError) as info:
            c.check_registered("service_test_ops:crashes", x=x64())
        assert info.value.code == "INTERNAL" and "died (exit code 3)" in str(info.value)
        wait_idle(guarded)
        wait_for_a_ready_worker(guarded)
        assert c.check_registered("service_test_ops:slow_square", x=x64(), params={"delay": 0.0}).ok


def test_cancelling_an_isolated_check_kills_its_worker(guarded: Running) -> None:
    pool = guarded.server.service.workers
    assert pool is not None
    killed = pool.killed
    service_test_ops.reset()
    request = build_request(
        Registered("service_test_ops:slow_square", {"delay": 0.05}),
        points=[{"x": torch.linspace(1, 2, 40, dtype=F64)}],
        options={"chunk_size": 1, "mode": "full"},
    )
    with grpc.insecure_channel(guarded.address) as channel:
        future = pb_grpc.GradcheckServiceStub(channel).Check.future(request, timeout=30)
        deadline = time.monotonic() + 10
        while service_test_ops.calls["slow_square"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        future.cancel()
    assert calls_stop_growing()
    wait_idle(guarded)
    assert pool.killed == killed + 1 and pool.busy == 0
    wait_for_a_ready_worker(guarded)


def test_worker_answers_equal_thread_answers(guarded: Running) -> None:
    """The same operator function gives the same report in a worker as in a server thread."""
    threaded = start_server(replica_name="guarded", isolation="thread")
    try:
        assert threaded.server.service.workers is None
        answers = []
        for running in (guarded, threaded):
            with Client(running.address, timeout=30) as c:
                report = c.check_registered("service_test_ops:BadBackward", x=x64(1.5))
            answers.append(report.model_dump(exclude={"timings"}))
        assert answers[0] == answers[1] and not answers[0]["ok"]
        with Client(guarded.address, timeout=30) as c:
            errors = c.check_registered("service_test_ops:raises_when_negative", x=x64(-1.0))
        assert errors.error and "negative input" in errors.error
    finally:
        threaded.server.stop(grace=0)


def test_expressions_and_builtins_stay_in_threads_unless_asked(guarded: Running) -> None:
    pool = guarded.server.service.workers
    assert pool is not None
    started = pool.started
    with Client(guarded.address, timeout=30) as c:
        assert c.check("sin(x)", x=x64()).ok
        assert c.check_registered("torch.sin", x=x64()).ok
    assert pool.started == started and pool.busy == 0
    everything = start_server(isolation="process", max_check_seconds=5.0)
    try:
        with Client(everything.address, timeout=30) as c:
            assert c.check("sin(x)", x=x64()).ok
        assert everything.server.service.workers is not None
        assert everything.server.service.workers.started >= 1 and everything.server.service.workers.busy == 0
    finally:
        everything.server.stop(grace=0)
