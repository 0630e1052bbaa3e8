"""The client waits out a busy server: the server never queues, it refuses with RetryInfo, and the
client sends the call again after the wait it asks for, within ``busy_wait`` and the call's timeout."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from service_servers import start_server

from gradcheck_svc.client import Client, Registered, build_request
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
# Eight columns one at a time, 0.2 s each: the only slot is held for about 1.6 s.
SLOW = build_request(
    Registered("service_test_ops:slow_square", {"delay": 0.2}),
    points=[{"x": torch.linspace(1, 2, 8, dtype=F64)}],
    options={"chunk_size": 1},
)


@pytest.fixture
def one_slot():
    running = start_server(replica_name="one-slot", isolation="thread", max_concurrent_checks=1)
    yield running
    running.server.stop(grace=0)


def _hold_the_slot(address: str) -> tuple[threading.Thread, list]:
    """A raw client holding the server's only slot; the thread ends with its answer."""
    answers: list = []

    def hold() -> None:
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            answers.append(pb_grpc.GradcheckServiceStub(channel).Check(SLOW, timeout=60))

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.4)  # the slow check is running by now
    return thread, answers


def test_a_busy_server_is_waited_out(one_slot):
    holder, answers = _hold_the_slot(one_slot.address)
    try:
        with Client(one_slot.address) as client:
            started = time.monotonic()
            report = client.check("x**2", x=torch.tensor(9.0, dtype=F64))
            waited = time.monotonic() - started
    finally:
        holder.join()
    assert report.ok and report.pairs[0].analytic == pytest.approx([18.0])
    assert answers and answers[0].reports[0].ok
    assert waited >= 0.9  # it came back after the server's RetryInfo (1 s), not at once


def test_without_busy_wait_the_refusal_is_raised_with_its_retry_delay(one_slot):
    holder, _ = _hold_the_slot(one_slot.address)
    try:
        with Client(one_slot.address, busy_wait=0) as client, pytest.raises(ServiceError) as refused:
            client.check("x**2", x=torch.tensor(9.0, dtype=F64))
    finally:
        holder.join()
    assert refused.value.code == "RESOURCE_EXHAUSTED" and refused.value.reason == "SERVER_BUSY"
    assert refused.value.retry_after == pytest.approx(1.0)


def test_the_wait_stays_within_the_call_timeout(one_slot):
    holder, _ = _hold_the_slot(one_slot.address)
    try:
        with Client(one_slot.address, timeout=0.5) as client, pytest.raises(ServiceError) as refused:
            started = time.monotonic()
            client.check("x**2", x=torch.tensor(9.0, dtype=F64))
        assert time.monotonic() - started < 1.0  # a 1 s wait would pass the 0.5 s timeout: raised
    finally:
        holder.join()
    assert refused.value.reason == "SERVER_BUSY"


def test_busy_wait_must_not_be_negative():
    with pytest.raises(ValueError, match="busy_wait"):
        Client("127.0.0.1:1", busy_wait=-1)
