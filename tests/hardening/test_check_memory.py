"""The memory of all checks at once is capped, not only each check's: max_check_bytes_in_flight.

Every check not sized up front as small may grow to max_check_bytes (the per-op guard stops it
there), so without a server-wide cap a server with many slots could be asked for slots x
max_check_bytes at once. Here the cap holds one such check: a second is refused with
RESOURCE_EXHAUSTED (SERVER_BUSY, RetryInfo, QuotaFailure naming the limit) while light checks still
run, and the memory comes back when the first check is cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from service_servers import Running, refusal, start_server

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.settings import MiB, Settings
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
LIGHT = build_request("x * x", points=[{"x": torch.tensor(9.0, dtype=F64)}])
# More inputs than a light check may have: each of these holds max_check_bytes while it runs.
HEAVY = build_request("x * x", points=[{"x": torch.linspace(1, 2, 5000, dtype=F64)}])
HEAVY_AND_SLOW = build_request(
    Registered("service_test_ops:slow_square", {"delay": 1.0}),
    points=[{"x": torch.linspace(1, 2, 5000, dtype=F64)}],
)


@pytest.fixture
def server() -> Iterator[Running]:
    running = start_server(
        replica_name="memory",
        isolation="thread",
        max_concurrent_checks=4,
        max_check_bytes=64 * MiB,
        max_check_bytes_in_flight=100 * MiB,  # room for one 64 MiB check, not two
    )
    yield running
    running.server.stop(grace=0)


def test_heavy_checks_share_one_memory_budget(server: Running) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        assert stub.Check(HEAVY, timeout=60).reports[0].ok  # alone, a heavy check runs
        holding = stub.Check.future(HEAVY_AND_SLOW, timeout=120)
        time.sleep(0.5)  # it is running now: each of its evaluations takes a second
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(HEAVY, timeout=60)
        error = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "max_check_bytes_in_flight" in error.details()  # type: ignore[attr-defined]
        assert refusal(error) == ("SERVER_BUSY", ["max_check_bytes_in_flight"], True)
        assert stub.Check(LIGHT, timeout=60).reports[0].ok  # small checks hold no share of it
        assert not holding.done()
        holding.cancel()
        deadline = time.monotonic() + 20
        while True:  # the cancelled check gives its memory back once it stops
            try:
                assert stub.Check(HEAVY, timeout=60).reports[0].ok
                break
            except grpc.RpcError as exc:
                assert refusal(exc)[0] == "SERVER_BUSY" and time.monotonic() < deadline
                time.sleep(0.1)


def test_a_streams_heavy_items_wait_for_memory_as_they_wait_for_a_slot(server: Running) -> None:
    """A CheckStream is a queue its client chose: an item past the memory left waits for it (as for
    a slot) instead of answering SERVER_BUSY, while a unary Check in that moment is refused."""
    items = [
        pb.CheckStreamRequest(id="slow", request=HEAVY_AND_SLOW),
        pb.CheckStreamRequest(id="after", request=HEAVY),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        answers = stub.CheckStream(iter(items), timeout=120)
        time.sleep(0.5)  # both items started: the slow one holds the memory, the other waits
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(HEAVY, timeout=60)
        assert refusal(refused.value)[0] == "SERVER_BUSY"
        got = {answer.id: answer for answer in answers}
    assert set(got) == {"slow", "after"}
    assert all(answer.HasField("response") for answer in got.values()), got
    assert all(answer.response.reports[0].ok for answer in got.values())


def test_the_default_budget_is_a_share_of_the_machine() -> None:
    settings = Settings()
    assert settings.max_check_bytes <= settings.check_bytes_in_flight
    assert Settings(max_check_bytes_in_flight=3 * MiB).check_bytes_in_flight == 3 * MiB


def test_a_check_with_small_inputs_and_outputs_but_a_large_jacobian_is_not_light(server: Running) -> None:
    """650 inputs and 30,000 outputs are each small, but full mode holds their 2e7-entry Jacobian
    dense (1.4 GB in-process): such a check runs under the per-check guard and is stopped at
    max_check_bytes, instead of running unguarded in a handler thread."""
    outer = build_request(
        "outer(x, y)",
        points=[{"x": torch.rand(600, dtype=F64), "y": torch.rand(50, dtype=F64)}],
        options={"mode": "full"},
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(outer, timeout=120)
        assert refusal(refused.value)[:2] == ("LIMIT_EXCEEDED", ["max_check_bytes"])
        assert stub.Check(LIGHT, timeout=60).reports[0].ok  # the server serves on
