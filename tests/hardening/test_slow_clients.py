"""Clients that start calls and never send their request: they cannot hold the server's threads.

gRPC reads a unary call's request before any handler runs and waits for it as long as the client
likes; without the share taken first and a time limit on the body, one client opening more calls
than the server has handler threads, with no deadline and no body, turns every other client away
for as long as it likes. Here the hostile client speaks raw gRPC and its bodies never come (the
request iterator blocks until the test ends): it holds at most its share, its calls beyond that are
refused while their bodies are still unsent, a missing token is refused the same way, its waiting
calls are cancelled after ``request_body_seconds``, and a client with its own token is served
throughout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from service_servers import Running, refusal, start_server

from gradcheck_svc.client import build_request
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

SEED = build_request("x**2", points=[{"x": torch.tensor(9.0, dtype=torch.float64)}])
CHECK = "/gradcheck_svc.v1.GradcheckService/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HOSTILE, POLITE = "hostile-token", "polite-token"


def reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason, or "" for gRPC's own refusals (no details)."""
    return refusal(error)[0] if rpc_status.from_call(error) is not None else ""  # type: ignore[arg-type]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def server() -> Iterator[Running]:
    running = start_server(
        replica_name="slow-bodies",
        isolation="thread",
        max_concurrent_checks=4,  # 12 handler threads, 6 calls per client
        auth_tokens=f"{HOSTILE},{POLITE}",
        request_body_seconds=10.0,
    )
    yield running
    running.server.stop(grace=0)


@pytest.fixture
def never_sent() -> Iterator[Callable[[], Iterator[bytes]]]:
    """Makes request streams that send nothing until the test is over."""
    over = threading.Event()

    def nothing() -> Iterator[bytes]:
        over.wait()
        return
        yield b""

    yield nothing
    over.set()


def bodiless(
    channel: grpc.Channel, requests: Callable[[], Iterator[bytes]], token: str, method: str = CHECK
) -> Any:
    """A call of ``method`` that sends its metadata and never its message (no deadline)."""
    if method == CHECK:
        return channel.stream_unary(method).future(requests(), metadata=bearer(token))
    return channel.stream_stream(method)(requests(), metadata=bearer(token))


def test_calls_without_a_body_hold_a_share_then_are_cancelled(
    server: Running, never_sent: Callable[[], Iterator[bytes]]
) -> None:
    settings = server.server.service.settings
    assert settings.threads == 12 and settings.calls_per_client == 6
    with grpc.insecure_channel(server.address) as hostile, grpc.insecure_channel(server.address) as polite:
        calls = [bodiless(hostile, never_sent, HOSTILE) for _ in range(2 * settings.threads)]
        beyond = len(calls) - settings.calls_per_client
        deadline = time.monotonic() + 30
        while sum(call.done() for call in calls) < beyond:  # the refusals have all come back
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stub = pb_grpc.GradcheckServiceStub(polite)
        # Served while the hostile calls wait for bodies that never come: they hold 6 threads, not 12.
        assert stub.Check(SEED, timeout=30, metadata=bearer(POLITE)).reports[0].ok
        assert not all(call.done() for call in calls)  # (they were still waiting)
        # Each call past the share was refused with nothing of it read (no body was ever sent); the
        # others are cancelled request_body_seconds later. gRPC itself may refuse calls beyond
        # every thread (no details) before any handler runs.
        ends = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=60)
            ends.append(reason(ended.value) or ended.value.code().name)  # type: ignore[attr-defined]
        assert ends.count("CANCELLED") == settings.calls_per_client
        assert set(ends) <= {"CANCELLED", "CLIENT_BUSY", "RESOURCE_EXHAUSTED"} and "CLIENT_BUSY" in ends
        deadline = time.monotonic() + 20
        stub_hostile = pb_grpc.GradcheckServiceStub(hostile)
        while True:  # the hostile token's share is free again: its own well-formed call runs
            try:
                assert stub_hostile.Check(SEED, timeout=30, metadata=bearer(HOSTILE)).reports[0].ok
                break
            except grpc.RpcError as exc:
                assert refusal(exc)[0] == "CLIENT_BUSY" and time.monotonic() < deadline
                time.sleep(0.05)


def test_a_missing_token_is_refused_before_the_body(
    server: Running, never_sent: Callable[[], Iterator[bytes]]
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = bodiless(channel, never_sent, "not-a-token")
        with pytest.raises(grpc.RpcError) as refused:
            call.result(timeout=30)  # no body was sent: the refusal did not wait for one
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert refusal(refused.value)[0] == "TOKEN_INVALID"


def test_a_unary_call_that_ends_without_its_message_is_invalid(server: Running) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_unary(CHECK).future(iter(()), metadata=bearer(POLITE))
        with pytest.raises(grpc.RpcError) as refused:
            call.result(timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert refusal(refused.value)[0] == "REQUEST_INVALID"


def test_open_reflection_streams_count_against_the_share(
    server: Running, never_sent: Callable[[], Iterator[bytes]]
) -> None:
    share = server.server.service.settings.calls_per_client
    with grpc.insecure_channel(server.address) as hostile, grpc.insecure_channel(server.address) as polite:
        streams = [bodiless(hostile, never_sent, HOSTILE, REFLECTION) for _ in range(share + 1)]
        with pytest.raises(grpc.RpcError) as refused:
            next(streams[-1])
        assert refusal(refused.value)[0] == "CLIENT_BUSY"
        # Reflection still answers another client.
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(
            polite.stream_stream(REFLECTION)(iter([ask.SerializeToString()]), metadata=bearer(POLITE))
        )
        assert b"gradcheck_svc.v1.GradcheckService" in answer
        for stream in streams[:-1]:
            stream.cancel()
        assert (
            pb_grpc.GradcheckServiceStub(hostile)
            .Check(SEED, timeout=30, metadata=bearer(HOSTILE))
            .reports[0]
            .ok
        )


def test_a_well_formed_body_sent_as_a_stream_is_checked(server: Running) -> None:
    """The wire is unchanged: one message then half-close, whichever way the client sends it."""
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_unary(CHECK, response_deserializer=pb.CheckResponse.FromString)
        response = call(iter([SEED.SerializeToString()]), timeout=30, metadata=bearer(POLITE))
        assert response.reports[0].ok and response.reports[0].pairs


def test_huge_metadata_is_refused_and_the_server_serves_on(server: Running) -> None:
    """Headers of a megabyte (a huge token, many keys) end that call at gRPC's metadata limit; the
    server neither parses them into memory nor stops serving."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        for metadata in (bearer("x" * 1_000_000), tuple((f"k{i}", "v" * 1000) for i in range(1000))):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Check(SEED, timeout=30, metadata=metadata)
            error = refused.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "metadata size exceeds" in error.details()  # type: ignore[attr-defined]
        assert stub.Check(SEED, timeout=30, metadata=bearer(POLITE)).reports[0].ok


def test_health_watches_count_against_the_share(server: Running) -> None:
    """Health Watch needs no token and each open stream counts against gRPC's limit of calls at
    once: one client's watches beyond its share are refused, so they cannot have every other call
    refused; the watches it keeps still answer, from health's own pool."""
    share = server.server.service.settings.calls_per_client
    threads = server.server.service.settings.threads
    with grpc.insecure_channel(server.address) as channel, grpc.insecure_channel(server.address) as polite:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(threads + 4)]
        try:
            statuses = []
            for watch in watches:
                try:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status))
                except grpc.RpcError as exc:
                    statuses.append(reason(exc) or exc.code().name)  # type: ignore[attr-defined]
            assert statuses.count("SERVING") == share
            assert set(statuses) <= {"SERVING", "CLIENT_BUSY", "RESOURCE_EXHAUSTED"}
            stub = pb_grpc.GradcheckServiceStub(polite)
            assert stub.Check(SEED, timeout=30, metadata=bearer(POLITE)).reports[0].ok
        finally:
            for watch in watches:
                watch.cancel()
