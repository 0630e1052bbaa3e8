"""One client cannot starve the others: at most max_calls_per_client of its calls run at once.

A client is its connection (or its bearer token when the server has tokens). The hostile client
here floods one connection with slow checks and idle CheckStreams; a second connection is still
served, the flood's extra calls get RESOURCE_EXHAUSTED (CLIENT_BUSY) with RetryInfo and QuotaFailure,
and the share comes back once the hostile calls end, cancelled ones included.
"""

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

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.settings import Settings
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
QUICK = build_request("x * x", points=[{"x": torch.tensor(9.0, dtype=F64)}])
SLOW = build_request(
    Registered("service_test_ops:slow_square", {"delay": 0.2}),
    points=[{"x": torch.linspace(1, 2, 8, dtype=F64)}],
    options={"chunk_size": 1},
)


def connection(address: str) -> grpc.Channel:
    # Channels of one process share their TCP connection unless told otherwise: each of these is a
    # connection of its own, as two client processes would have.
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture
def server() -> Iterator[Running]:
    running = start_server(
        replica_name="fair", isolation="thread", max_concurrent_checks=4, max_calls_per_client=2
    )
    yield running
    running.server.stop(grace=0)


def refusal(error: grpc.RpcError) -> tuple[str, list[str], bool]:
    """ErrorInfo's reason, QuotaFailure's subjects, and whether RetryInfo came along."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, subjects, retry = "", [], False
    for detail in status.details:
        info, quota = error_details_pb2.ErrorInfo(), error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(quota):
            subjects += [v.subject for v in quota.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = True
    return reason, subjects, retry


def test_a_flooding_client_leaves_room_for_others(server: Running) -> None:
    quiet = threading.Event()

    def idle() -> Iterator[pb.CheckStreamRequest]:
        quiet.wait(30)
        yield from ()

    with connection(server.address) as hostile_channel, connection(server.address) as other_channel:
        hostile = pb_grpc.GradcheckServiceStub(hostile_channel)
        other = pb_grpc.GradcheckServiceStub(other_channel)
        capabilities = other.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=30)
        assert capabilities.limits.max_calls_per_client == 2  # a client can know its share
        floods = [hostile.Check.future(SLOW, timeout=60) for _ in range(6)]
        streams = [hostile.CheckStream(idle(), timeout=60) for _ in range(8)]
        time.sleep(0.5)
        assert other.Check(QUICK, timeout=30).reports[0].ok
        with pytest.raises(grpc.RpcError) as extra:
            hostile.Check(QUICK, timeout=30)
        assert extra.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert refusal(extra.value) == ("CLIENT_BUSY", ["max_calls_per_client"], True)
        outcomes = []
        for flood in floods:
            try:
                outcomes.append(flood.result().reports[0].ok)
            except grpc.RpcError as exc:
                outcomes.append(refusal(exc)[0])
        # Two calls of the hostile client ran at a time: a check or an idle stream each.
        assert set(outcomes) <= {True, "CLIENT_BUSY"} and outcomes.count("CLIENT_BUSY") >= 4
        for stream in streams:
            stream.cancel()
        quiet.set()
        deadline = time.monotonic() + 10
        while True:  # cancelled streams give their share back
            try:
                assert hostile.Check(QUICK, timeout=30).reports[0].ok
                break
            except grpc.RpcError as exc:
                assert refusal(exc)[0] == "CLIENT_BUSY" and time.monotonic() < deadline
                time.sleep(0.05)


def test_with_tokens_a_client_is_its_token_on_any_connection() -> None:
    running = start_server(
        replica_name="fair-tokens",
        isolation="thread",
        max_concurrent_checks=4,
        max_calls_per_client=1,
        auth_tokens="alice,bob",
    )
    try:
        with connection(running.address) as first, connection(running.address) as second:
            alice = [("authorization", "Bearer alice")]
            holding = pb_grpc.GradcheckServiceStub(first).Check.future(SLOW, timeout=60, metadata=alice)
            time.sleep(0.3)
            stub = pb_grpc.GradcheckServiceStub(second)
            with pytest.raises(grpc.RpcError) as again:  # a second connection is still alice
                stub.Check(QUICK, timeout=30, metadata=alice)
            assert refusal(again.value)[0] == "CLIENT_BUSY"
            assert stub.Check(QUICK, timeout=30, metadata=[("authorization", "Bearer bob")]).reports[0].ok
            assert holding.result().reports[0].ok
            assert stub.Check(QUICK, timeout=30, metadata=alice).reports[0].ok
    finally:
        running.server.stop(grace=0)


def test_the_default_share_leaves_slots_and_threads_to_others() -> None:
    for checks in (2, 8, 32, 100):
        settings = Settings(max_concurrent_checks=checks)
        assert settings.calls_per_client < settings.threads
    default = Settings()
    assert default.calls_per_client < default.max_concurrent_checks
    assert Settings(max_calls_per_client=3).calls_per_client == 3
