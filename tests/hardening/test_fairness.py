"""One client cannot starve the others: at most max_calls_per_client of its calls run at once.

A client is its IP address (or its bearer token when the server has tokens, or each connection
with client_identity=connection). The hostile client here floods the server over many connections
of its own with slow checks and idle CheckStreams; a client from another address is still served,
the flood's extra calls get RESOURCE_EXHAUSTED (CLIENT_BUSY) with RetryInfo and QuotaFailure, and
the share comes back once the hostile calls end, cancelled ones included.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from service_servers import Running, refusal, start_server

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.server.fairness import ClientShareInterceptor, peer_address
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


def two_addresses(running: Running) -> tuple[str, str]:
    """The server as reached over IPv4 and over IPv6 loopback: two client addresses on one machine."""
    port = running.address.rpartition(":")[2]
    return f"127.0.0.1:{port}", f"[::1]:{port}"


@pytest.fixture
def server() -> Iterator[Running]:
    # "localhost" listens on both loopback addresses, so that clients can come from two addresses.
    running = start_server(
        replica_name="fair",
        host="localhost",
        isolation="thread",
        max_concurrent_checks=4,
        max_calls_per_client=2,
    )
    yield running
    running.server.stop(grace=0)


def test_a_flooding_client_leaves_room_for_others(server: Running) -> None:
    quiet = threading.Event()

    def idle() -> Iterator[pb.CheckStreamRequest]:
        quiet.wait(30)
        yield from ()

    hostile_address, other_address = two_addresses(server)
    hostile_channels = [connection(hostile_address) for _ in range(14)]  # a connection per call
    with connection(other_address) as other_channel:
        hostile = pb_grpc.GradcheckServiceStub(hostile_channels[0])
        each = [pb_grpc.GradcheckServiceStub(channel) for channel in hostile_channels]
        other = pb_grpc.GradcheckServiceStub(other_channel)
        capabilities = other.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=30)
        assert capabilities.limits.max_calls_per_client == 2  # a client can know its share
        floods = [stub.Check.future(SLOW, timeout=60) for stub in each[:6]]
        streams = [stub.CheckStream(idle(), timeout=60) for stub in each[6:]]
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
    for channel in hostile_channels:
        channel.close()


def test_each_connection_is_a_client_when_configured_so() -> None:
    """client_identity=connection (behind a proxy, where every client has the proxy's address):
    two connections from one address hold a share each."""
    running = start_server(
        replica_name="fair-connections",
        isolation="thread",
        max_concurrent_checks=4,
        max_calls_per_client=1,
        client_identity="connection",
    )
    try:
        with connection(running.address) as first, connection(running.address) as second:
            holding = pb_grpc.GradcheckServiceStub(first).Check.future(SLOW, timeout=60)
            time.sleep(0.3)
            stub = pb_grpc.GradcheckServiceStub(second)
            assert stub.Check(QUICK, timeout=30).reports[0].ok  # the same address, another client
            with pytest.raises(grpc.RpcError) as again:  # the first connection is at its share
                pb_grpc.GradcheckServiceStub(first).Check(QUICK, timeout=30)
            assert refusal(again.value)[0] == "CLIENT_BUSY"
            assert holding.result().reports[0].ok
    finally:
        running.server.stop(grace=0)


def test_peer_addresses_drop_the_port_and_the_ipv6_mapping() -> None:
    assert peer_address("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:%5B::1%5D:51234") == peer_address("ipv6:[::1]:4") == "ipv6:::1"
    assert peer_address("ipv6:%5B::ffff:10.0.0.7%5D:80") == "ipv4:10.0.0.7"
    assert peer_address("unix:/run/gradcheck.sock") == "unix:/run/gradcheck.sock"


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


def test_a_call_sent_the_moment_the_last_answer_came_is_not_refused() -> None:
    """The share of a call with one answer comes back before the answer is sent: a client with a
    share of one that sends each call as soon as it has the last answer is never CLIENT_BUSY."""
    running = start_server(
        replica_name="fair-back-to-back", isolation="thread", max_concurrent_checks=4, max_calls_per_client=1
    )
    try:
        with connection(running.address) as channel:
            stub = pb_grpc.GradcheckServiceStub(channel)
            for _ in range(50):
                assert stub.Check(QUICK, timeout=30).reports[0].ok
    finally:
        running.server.stop(grace=0)


class _Call:
    """What the share reads of a call, with gRPC's order of events made visible: callbacks run
    when the call has ended, after its answer went out."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:10.0.0.7:50000"

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


def _wrapped(interceptor: ClientShareInterceptor, handler: Any) -> Any:
    method = "/gradcheck_svc.v1.GradcheckService/Check"
    return interceptor.intercept_service(lambda _: handler, SimpleNamespace(method=method))


def test_the_share_comes_back_as_a_single_answer_is_returned_and_as_a_stream_ends() -> None:
    interceptor = ClientShareInterceptor(1, by_token=False)
    held_while_running: list[int] = []

    def answer(request: Any, context: Any) -> str:
        held_while_running.append(interceptor.share.running("peer:ipv4:10.0.0.7"))
        return "answer"

    unary = _wrapped(interceptor, grpc.unary_unary_rpc_method_handler(answer))
    call = _Call()
    # The request is read by the share's own handler, after the share is taken: gRPC hands it the
    # request stream of the unary call.
    assert unary.stream_unary(iter([None]), call) == "answer"
    assert held_while_running == [1]
    assert interceptor.share.running("peer:ipv4:10.0.0.7") == 0  # before the answer is sent
    call.end()
    assert interceptor.share.running("peer:ipv4:10.0.0.7") == 0

    def answers(request: Any, context: Any) -> Iterator[str]:
        yield "first"
        yield "second"

    streaming = _wrapped(interceptor, grpc.unary_stream_rpc_method_handler(answers))
    call = _Call()
    stream = streaming.stream_stream(iter([None]), call)
    assert list(stream) == ["first", "second"]
    assert interceptor.share.running("peer:ipv4:10.0.0.7") == 1  # until gRPC ends the call
    call.end()
    assert interceptor.share.running("peer:ipv4:10.0.0.7") == 0
