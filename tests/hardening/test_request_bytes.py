"""Many near-limit requests at once cannot multiply their memory: the bytes of the requests being
checked are capped server-wide (max_request_bytes_in_flight). Beyond the cap a large request is
refused at once, RESOURCE_EXHAUSTED (SERVER_BUSY) with RetryInfo and the limit named (a
CheckStream's items wait for room, read no further meanwhile); small requests never count, and one
request alone always fits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from service_servers import Running, start_server

from gradcheck_svc.client import build_request
from gradcheck_svc.server.limiter import ByteBudget
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
BUDGET = 1 << 20
# 800 kB of y, which is not checked: one Jacobian column, so the check itself is quick.
LARGE = build_request(
    "x * sum(y)",
    points=[{"x": torch.tensor(2.0, dtype=F64, requires_grad=True), "y": torch.ones(100_000, dtype=F64)}],
)
SMALL = build_request("x * x", points=[{"x": torch.tensor(9.0, dtype=F64)}])


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    running = start_server(replica_name="bytes", isolation="thread", max_request_bytes_in_flight=BUDGET)
    yield running
    running.server.stop(grace=0)


def test_large_requests_beyond_the_budget_wait_their_turn(running: Running) -> None:
    budget = running.server.service.request_bytes
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        assert stub.Check(LARGE, timeout=60).reports[0].ok  # alone: fits
        assert budget.used == 0  # given back
        assert budget.try_take(LARGE.ByteSize())  # another large request in flight
        try:
            with pytest.raises(grpc.RpcError) as busy:
                stub.Check(LARGE, timeout=60)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            status = rpc_status.from_call(busy.value)  # type: ignore[arg-type]
            assert status is not None
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            assert any(d.Unpack(info) for d in status.details)
            assert info.reason == "SERVER_BUSY"
            assert dict(info.metadata) == {"limit": "max_request_bytes_in_flight", "value": str(BUDGET)}
            assert any(d.Unpack(retry) for d in status.details)
            assert stub.Check(SMALL, timeout=60).reports[0].ok  # small requests do not count
        finally:
            budget.give_back(LARGE.ByteSize())
        assert stub.Check(LARGE, timeout=60).reports[0].ok
        assert budget.used == 0


def test_one_request_alone_fits_a_budget_smaller_than_itself() -> None:
    budget = ByteBudget(10)
    assert budget.try_take(100) and not budget.try_take(1)
    budget.give_back(100)
    assert budget.try_take(5) and budget.try_take(5) and not budget.try_take(1)


def test_stream_items_beyond_the_budget_wait_and_are_read_no_further(running: Running) -> None:
    """A CheckStream's items hold their bytes from the moment they are read: past the budget the
    reader waits for room instead of reading more items into memory (or refusing them)."""
    budget = running.server.service.request_bytes
    items = [pb.CheckStreamRequest(id=str(k), request=LARGE) for k in range(3)]
    assert budget.try_take(LARGE.ByteSize())  # another large request in flight
    released = False
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.GradcheckServiceStub(channel)
            answers = stub.CheckStream(iter(items), timeout=60)
            got: list[pb.CheckStreamResponse] = []
            reader = threading.Thread(target=lambda: got.extend(answers))
            reader.start()
            time.sleep(1.0)  # time enough for a refusal to come back, had there been one
            assert got == [] and budget.used == LARGE.ByteSize()  # the first item waits, holding nothing
            budget.give_back(LARGE.ByteSize())
            released = True
            reader.join(60)
        assert sorted(a.id for a in got) == ["0", "1", "2"]
        assert all(a.HasField("response") and a.response.reports[0].ok for a in got)
        assert budget.used == 0
    finally:
        if not released:
            budget.give_back(LARGE.ByteSize())
