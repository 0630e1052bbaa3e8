"""SIGTERM: health NOT_SERVING, new checks refused, in-flight checks finish, exit 0."""

from __future__ import annotations

import signal
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_servers import ServeProcess

from gradcheck_svc.client import Registered, build_request
from gradcheck_svc.codec import decode_report
from gradcheck_svc.v1 import gradcheck_pb2_grpc as pb_grpc


def health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_sigterm_drains_in_flight_checks_and_exits_0(draining_server: ServeProcess) -> None:
    process = draining_server
    slow = build_request(
        Registered("service_test_ops:slow_square", {"delay": 0.1}),
        points=[{"x": torch.linspace(1, 2, 15, dtype=torch.float64)}],
        options={"chunk_size": 1},
    )
    with grpc.insecure_channel(process.address) as channel:
        stub = pb_grpc.GradcheckServiceStub(channel)
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        in_flight = stub.Check.future(slow, timeout=60)
        time.sleep(0.5)  # the check is running
        process.proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 5
        while health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never said NOT_SERVING"
            time.sleep(0.05)
        try:
            stub.Check(build_request("x**2", points=[{"x": torch.tensor(3.0)}]), timeout=5)
            raise AssertionError("a new check was accepted while draining")
        except grpc.RpcError as refused:
            assert refused.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

        report = decode_report(in_flight.result(timeout=30).reports[0])
    assert report.ok and report.served_by == "draining"
    assert process.proc.wait(timeout=20) == 0
    log = process.log()
    assert "SIGTERM received: draining 1 in-flight checks" in log and "stopped" in log
