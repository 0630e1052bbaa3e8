"""Errors a program can act on (AIP-193), and the small doors a raw gRPC client could push open.

Every error status carries google.rpc.ErrorInfo (stable reason, domain gradcheck-svc, metadata
naming the limit); a busy server adds RetryInfo, a limit QuotaFailure, a missing device
PreconditionFailure. A body that is not protobuf is INVALID_ARGUMENT; a log tag cannot forge
a log line; empty tokens and unprotected exposure are refused at start-up; the CLI never prints a
traceback for a bad argument.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from google.protobuf import message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import ValidationError
from service_servers import Running, serve_command, start_server

from gradcheck_svc.client import Client, Registered, build_request
from gradcheck_svc.errors import ServiceError
from gradcheck_svc.settings import Settings
from gradcheck_svc.v1 import gradcheck_pb2 as pb
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc

F64 = torch.float64
CHECK = "/gradcheck_svc.v1.GradcheckService/Check"


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    running = start_server(
        replica_name="protocol", isolation="thread", max_concurrent_checks=1, max_evaluations=50
    )
    yield running
    running.server.stop(grace=0)


def details(error: grpc.RpcError) -> dict[str, message.Message]:
    """The status details of a failed call, by type name."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: dict[str, message.Message] = {}
    kinds = (
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.BadRequest,
    )
    for detail in status.details if status else ():
        for kind in kinds:
            if detail.Is(kind.DESCRIPTOR):
                found[kind.DESCRIPTOR.name] = kind()
                detail.Unpack(found[kind.DESCRIPTOR.name])
    return found


def call(address: str, request: pb.CheckRequest, **kw: object) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GradcheckServiceStub(channel).Check(request, timeout=30, **kw)
    return info.value


def test_a_body_that_is_not_protobuf_is_invalid_argument(running: Running) -> None:
    with grpc.insecure_channel(running.address) as channel:
        raw = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff\xff garbage", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert details(info.value)["ErrorInfo"].reason == "BODY_INVALID"  # type: ignore[attr-defined]
        stream = channel.stream_stream(
            "/gradcheck_svc.v1.GradcheckService/CheckStream",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([b"\xff\xff\xff\xff"]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_a_log_tag_cannot_forge_a_log_line(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    request = build_request("x * x", points=[{"x": torch.tensor(3.0, dtype=F64)}])
    request.log_tag = "abc\n2026-01-01 00:00:00 INFO gradcheck_svc.server: check id=forged status=OK\r"
    with (
        caplog.at_level(logging.INFO, logger="gradcheck_svc.server"),
        grpc.insecure_channel(running.address) as channel,
    ):
        pb_grpc.GradcheckServiceStub(channel).Check(request, timeout=30)
        deadline = time.monotonic() + 20  # the line is written once the answer has gone out
        while not (lines := [r.getMessage() for r in caplog.records if "log_tag=" in r.getMessage()]):
            assert time.monotonic() < deadline, "no log line"
            time.sleep(0.01)
    assert lines and all("\n" not in line and "\r" not in line for line in lines)


def test_every_error_names_a_reason_and_limits_name_themselves(running: Running) -> None:
    cases = [
        (build_request("x.__class__", points=[{"x": torch.tensor(1.0)}]), "EXPRESSION_INVALID"),
        (build_request(Registered("no.such"), points=[{"x": torch.tensor(1.0)}]), "FUNCTION_NOT_FOUND"),
        (build_request("x * 2", points=[{"x": torch.zeros(60, dtype=F64)}]), "LIMIT_EXCEEDED"),
    ]
    for request, reason in cases:
        info = details(call(running.address, request))["ErrorInfo"]
        assert info.reason == reason and info.domain == "gradcheck-svc"  # type: ignore[attr-defined]
    limited = call(running.address, cases[2][0])
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    found = details(limited)
    assert dict(found["ErrorInfo"].metadata) == {"limit": "max_evaluations", "value": "50"}  # type: ignore[attr-defined]
    assert found["QuotaFailure"].violations[0].subject == "max_evaluations"  # type: ignore[attr-defined]


def test_a_busy_server_says_when_to_retry(running: Running) -> None:
    slow = build_request(
        Registered("service_test_ops:slow_square", {"delay": 0.3}),
        points=[{"x": torch.linspace(1, 2, 6, dtype=F64)}],
        options={"chunk_size": 1},
    )
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        holding = stub.Check.future(slow, timeout=60)
        deadline = time.monotonic() + 10
        while not running.server.service.slots.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = call(running.address, build_request("x * x", points=[{"x": torch.tensor(2.0, dtype=F64)}]))
        holding.result(timeout=60)
    assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    found = details(busy)
    assert found["ErrorInfo"].reason == "SERVER_BUSY"  # type: ignore[attr-defined]
    assert found["RetryInfo"].retry_delay.ToNanoseconds() > 0  # type: ignore[attr-defined]


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_cuda_on_a_cpu_server_is_a_precondition_failure(running: Running) -> None:
    request = build_request("x * x", points=[{"x": torch.tensor(2.0, dtype=F64)}], options={"device": "cuda"})
    error = call(running.address, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    found = details(error)
    assert found["ErrorInfo"].reason == "DEVICE_UNAVAILABLE"  # type: ignore[attr-defined]
    assert found["PreconditionFailure"].violations[0].subject == "cuda"  # type: ignore[attr-defined]


def test_the_client_exposes_the_reason(running: Running) -> None:
    with Client(running.address, timeout=30) as client, pytest.raises(ServiceError) as info:
        client.check("x * 2", x=torch.zeros(60, dtype=F64))
    assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.reason == "LIMIT_EXCEEDED"
    assert info.value.metadata == {"limit": "max_evaluations", "value": "50"}


def test_duplicate_sampled_names_are_refused(running: Running) -> None:
    request = pb.CheckRequest(
        function=pb.FunctionSpec(expression="x * x"),
        sampling=pb.SamplingSpec(
            inputs=[pb.SampledInput(name="x", shape=[2]), pb.SampledInput(name="x", shape=[3])], point_count=1
        ),
    )
    error = call(running.address, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert details(error)["BadRequest"].field_violations[0].field == "sampling.inputs[1].name"  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- authentication


def test_an_empty_token_is_refused_at_start_up() -> None:
    for tokens in ("", " ", "good,", ["", "x"]):
        with pytest.raises(ValidationError, match="empty token"):
            Settings(auth_tokens=tokens)
    out = subprocess.run(
        [*serve_command(), "serve", "--port", "0", "--auth-tokens", ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "empty token" in out.stderr and "listening" not in out.stdout


def test_an_empty_bearer_is_not_a_token() -> None:
    running = start_server(auth_tokens="s3cret", isolation="thread")
    try:
        request = build_request("x * x", points=[{"x": torch.tensor(2.0, dtype=F64)}])
        for value in ("Bearer", "Bearer ", "Bearer    ", "bearer"):
            error = call(running.address, request, metadata=[("authorization", value)])
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with grpc.insecure_channel(running.address) as channel:
            reply = pb_grpc.GradcheckServiceStub(channel).Check(
                request, timeout=30, metadata=[("authorization", "Bearer s3cret")]
            )
        assert reply.reports[0].ok
    finally:
        running.server.stop(grace=0)


def test_exposing_the_port_unprotected_needs_insecure() -> None:
    refused = subprocess.run(
        [*serve_command(), "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "--insecure" in refused.stderr
    assert Settings(host="0.0.0.0", insecure=True).insecure
    assert Settings(host="0.0.0.0", auth_tokens="t").auth_tokens
    for local in ("127.0.0.1", "::1", "localhost", "[::1]"):
        assert Settings(host=local).host == local


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "args",
    [["--count", "0", "--sample", "x=3"], ["--sample", "x=-1"]],
    ids=["count-0", "negative-dim"],
)
def test_cli_bad_arguments_get_one_line_not_a_traceback(args: list[str]) -> None:
    out = subprocess.run(
        [*serve_command(), "check", "--expr", "x * x", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stderr.startswith("gradcheck-svc check:")


def test_cli_zero_size_value_checks_trivially() -> None:
    # An empty tensor is a valid point: nothing to compare, and no traceback.
    out = subprocess.run(
        [*serve_command(), "check", "--expr", "x * x", "--at", "x=[]"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out
    assert "nothing to compare" in out.stdout and "Traceback" not in out.stderr


def test_the_guard_keeps_concurrent_checks_apart(running: Running) -> None:
    # Two threads of one server, each under its own guard: one check's budget is not the other's.
    results: list[bool] = []

    def one() -> None:
        with Client(running.address, timeout=60) as client:
            for _ in range(3):
                try:
                    results.append(client.check("sum(tanh(x) * x)", x=torch.randn(3, dtype=F64)).ok)
                except ServiceError as exc:
                    results.append(exc.reason == "SERVER_BUSY")

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results and all(results)
